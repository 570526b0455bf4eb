"""A tokenizer's settings: architecture, regularizers and training, and the named presets.

`TokenizerConfig` (with its `TrainConfig` under `train`) is a `quasid.core.config.Config`;
the registry's presets (`configs/tokenizers.yaml`: tokenizer name -> the fields it sets)
and `tokenizer_config(name, overrides)` build one, overrides merged the one way every
config is (`merge`, nested: `{"latent": 16, "train": {"epochs": 5}}`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import model_validator

from quasid.core.config import CONFIGS_DIR, Config, ConfigError, load_yaml, merge

PRESETS_FILE = CONFIGS_DIR / "tokenizers.yaml"


class TrainConfig(Config):
    """How a neural tokenizer trains (shared by all of them).

    `compile` runs the losses through `torch.compile`. `cuda_graph` captures the whole
    training step (forward, losses, backward, clipping, AdamW; `fit.GraphedStep`) as one CUDA
    graph after a few eager warm-up steps and replays it, so the launch-bound GPU step costs
    one launch: used on CUDA with the dense pair path only (ignored on the CPU), not with EMA
    codebooks. Both together capture the compiled losses' fused kernels in the graph (the
    warm-up steps compile): the fastest GPU step (step times in benchmarks/README.md).
    """

    epochs: int = 75
    batch_size: int = 1024
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_share: float = 0.05
    final_lr_share: float = 0.05
    grad_clip: float = 1.0
    neighbours: int = 8
    # conflict mining: the content-neighbour partner is drawn among the anchor's neighbours
    # that the tokenizer's repulsion acts on (HaMR: CVPM-valid; uniform: H <= h_u), if any
    mine_conflicts: bool = False
    reseed_every: int = 1
    reseed_until: float = 0.8
    eval_every: int = 1
    checkpoint_every: int = 10
    amp: bool = True
    compile: bool = False
    cuda_graph: bool = False
    seed: int = 0

    @model_validator(mode="after")
    def _valid(self) -> TrainConfig:
        bad = {k: getattr(self, k) for k, ok in {
            "epochs": self.epochs >= 1,
            "batch_size": self.batch_size >= 4 and self.batch_size % 4 == 0,
            "lr": self.lr > 0, "warmup_share": 0 <= self.warmup_share < 1,
            "final_lr_share": 0 <= self.final_lr_share <= 1, "eval_every": self.eval_every >= 1,
            "checkpoint_every": self.checkpoint_every >= 1, "reseed_every": self.reseed_every >= 0,
        }.items() if not ok}
        if bad:
            raise ValueError(f"TrainConfig: invalid value(s) {bad}")
        return self



class TokenizerConfig(Config):
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
    # > 1 (default): no exemption; <= 1: pairs whose content cosine exceeds it are exempt, as
    # CVPM's near-duplicate rule (the ablation "uniform that keeps near-duplicates")
    uniform_tau_dup: float = 2.0
    # collaborative positives: co-interacted within `pair_window` positions by at least
    # `pair_min_count` users (one chance co-occurrence is no evidence of a shared audience)
    pair_window: int = 2
    pair_min_count: int = 2
    kmeans_iters: int = 25
    train: TrainConfig = TrainConfig()

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
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TokenizerConfig:
        """Inverse of `to_dict`; unknown keys are an error naming them."""
        return cls.model_validate(dict(data))


PRESETS: dict[str, dict] = load_yaml(PRESETS_FILE)
"""The registry: tokenizer name -> the config fields it sets (`configs/tokenizers.yaml`)."""


def tokenizer_config(name: str, overrides: Mapping[str, Any] | None = None) -> TokenizerConfig:
    """The preset config of `name` with nested `overrides` merged in.

    Raises `ConfigError` (a ValueError) for an unknown name or override key, naming the
    known ones.
    """
    if name not in PRESETS:
        raise ConfigError(f"unknown tokenizer {name!r}; known: {sorted(PRESETS)}")
    if overrides and "name" in overrides:
        raise ConfigError(f"overrides for tokenizer {name!r}: 'name' cannot be overridden")
    cfg = TokenizerConfig(name=name, **PRESETS[name])
    return merge(cfg, overrides, f"overrides for tokenizer {name!r}")
