"""Training the SID tokenizers: the seeded fit loop and the `train` pipeline over a dataset folder.

`fit_model` is the loop: k-means codebook init, AdamW with linear warm-up and cosine decay,
bf16 autocast on CUDA (the quantizer and the losses stay in fp32), gradient clipping,
dead-code re-seeding after each epoch, per-epoch losses and SID metrics, a rich progress
bar, and a checkpoint that a rerun with the same config resumes from (same seed, same
result as an uninterrupted run, on the CPU).

`train_tokenizer` is what `quasid train` and the flows call: data folder in, SID table,
tokenizer, metrics and plot out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from quasid.tokenizer.config import TokenizerConfig
from dataclasses import asdict, field


@dataclass(frozen=True)
class TrainConfig:
    """How a neural tokenizer trains (shared by all of them)."""

    epochs: int = 75
    batch_size: int = 1024
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_share: float = 0.05
    final_lr_share: float = 0.05
    grad_clip: float = 1.0
    neighbours: int = 8
    reseed_every: int = 1
    reseed_until: float = 0.8
    eval_every: int = 1
    checkpoint_every: int = 10
    amp: bool = True
    compile: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        bad = {k: getattr(self, k) for k, ok in {
            "epochs": self.epochs >= 1,
            "batch_size": self.batch_size >= 4 and self.batch_size % 4 == 0,
            "lr": self.lr > 0, "warmup_share": 0 <= self.warmup_share < 1,
            "final_lr_share": 0 <= self.final_lr_share <= 1, "eval_every": self.eval_every >= 1,
            "checkpoint_every": self.checkpoint_every >= 1, "reseed_every": self.reseed_every >= 0,
        }.items() if not ok}
        if bad:
            raise ValueError(f"TrainConfig: invalid value(s) {bad}")

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        """Build from a dict (lists become tuples); unknown keys are an error naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"TrainConfig: unknown key(s) {unknown} (known: {sorted(known)})")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


@dataclass(frozen=True)
class TokenizerConfig:
    """Architecture, regularizers and training of one tokenizer (see the module docstring)."""

    name: str = "rqvae"
    content_dim: int = 0  # set by fit from the content
    hidden: tuple[int, ...] = (512, 256, 128)
    latent: int = 32
    levels: int = 3
    codebook_size: int = 256
    beta: float = 0.25
    ema: bool = False
    ema_decay: float = 0.99
    # HaMR over CVPM-valid pairs
    hamr: bool = False
    hamr_weight: float = 20.0
    hamr_margin: float = 0.6
    hamr_gamma: float = 1.0
    h_max: int = 1  # -1: levels - 1; 1: full collisions and one-level differences
    tau_dup: float = 0.98
    # dual-tower contrastive over collaborative positives
    contrastive: bool = False
    contrastive_weight: float = 0.3
    tau: float = 0.1
    tower_dim: int = 64
    # AdaSID regulation
    adasid: bool = False
    adasid_weight: float = 5.0
    adasid_margin: float = 1.0
    rho_end: float = 0.1
    # uniform repulsion: pairs with H <= uniform_h_max (0: full collisions), all alike; the
    # ablation matches HaMR's strength: weight λ_h and HaMR's full-collision margin 2·m₀
    uniform: bool = False
    uniform_weight: float = 20.0
    uniform_margin: float = 1.2
    uniform_h_max: int = 0
    # collaborative positives: co-interacted within `pair_window` positions by at least
    # `pair_min_count` users (one chance co-occurrence is no evidence of a shared audience)
    pair_window: int = 2
    pair_min_count: int = 2
    kmeans_iters: int = 25
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def neural(self) -> bool:
        """False for `rqkmeans` (no encoder, no gradient training)."""
        return self.name != "rqkmeans"

    @property
    def max_hamming(self) -> int:
        """h_max with the default (-1) resolved to levels - 1."""
        return self.levels - 1 if self.h_max < 0 else self.h_max

    @property
    def needs_pairs(self) -> bool:
        """Whether training reads the collaborative-positive mask P."""
        return self.hamr or self.contrastive or self.adasid

    def to_dict(self) -> dict:
        """JSON-ready dict (the train config nested under `train`)."""
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, data: dict) -> TokenizerConfig:
        """Inverse of `to_dict`; unknown keys are an error naming them."""
        data = dict(data)
        train = TrainConfig.from_dict(data.pop("train", {}))
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"TokenizerConfig: unknown key(s) {unknown} (known: {sorted(known)})")
        if "hidden" in data:
            data["hidden"] = tuple(data["hidden"])
        return cls(train=train, **data)


PRESETS: dict[str, dict] = {
    "rqvae": {},
    "rqkmeans": {},
    "quasid": {"hamr": True, "contrastive": True},
    "adasid": {"adasid": True},
    "uniform": {"uniform": True},
    "rqvae+hamr": {"hamr": True},
    "adasid+hamr": {"adasid": True, "hamr": True},
}


def tokenizer_config(name: str, overrides: dict | None = None) -> TokenizerConfig:
    """The preset config of `name` with `overrides` (keys of TokenizerConfig or TrainConfig).

    Raises ValueError for an unknown name or override key, naming the known ones.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown tokenizer {name!r}; known: {sorted(PRESETS)}")
    cfg = TokenizerConfig(name=name, **PRESETS[name])
    top = {f.name for f in fields(TokenizerConfig)} - {"name", "train"}
    train_keys = {f.name for f in fields(TrainConfig)}
    tok_over, train_over = {}, {}
    for key, value in (overrides or {}).items():
        key = key.removeprefix("train.")
        if key in top:
            tok_over[key] = tuple(value) if key == "hidden" else value
        elif key in train_keys:
            train_over[key] = tuple(value) if isinstance(value, list) else value
        else:
            raise ValueError(f"unknown override {key!r} for tokenizer {name!r}; known: "
                             f"{sorted(top | train_keys)}")
    return replace(cfg, train=replace(cfg.train, **train_over), **tok_over)
