"""The SID tokenizers behind one interface, and their registry.

| name | what it trains |
| --- | --- |
| `rqvae` | reconstruction + residual quantization (the TIGER tokenizer) |
| `rqkmeans` | no gradient training: residual k-means on the standardized content (OneRec-style) |
| `quasid` | rqvae + HaMR over CVPM-valid pairs + dual-tower contrastive (collaborative positives) |
| `adasid` | rqvae + adaptive overlap regulation (compatibility-relaxed, load-scaled, scheduled) |
| `uniform` | rqvae + every collision (same full SID) repelled alike: no qualification or severity |
| `rqvae+hamr`, `adasid+hamr` | HaMR (with CVPM) plugged into the other tokenizers |

A `Tokenizer` fits on the content of the training items and optionally their collaborative
positive pairs, encodes any item from its content alone (new items need no retraining), and
saves to / loads from a folder (`tokenizer.pt` with weights and config, `tokenizer.json`
with the config for people). Total training loss:
L = L_rec + L_rq + λ_h HaMR + λ_c InfoNCE + λ_a AdaSID + λ_u Uniform (see `quasid.losses`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from quasid import losses as L
from quasid.batches import Batch
from quasid.contracts import write_text_atomic
from quasid.encoder import Decoder, Encoder, mlp
from quasid.quantizer import ResidualQuantizer
from quasid.training import TrainConfig, fit_model, save_atomic

MODEL_FILE = "tokenizer.pt"
CONFIG_FILE = "tokenizer.json"


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
"""The registry: tokenizer name -> the config fields it sets."""


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


class SIDModel(nn.Module):
    """Standardization, encoder, residual quantizer, decoder and contrastive towers.

    Content is standardized as x' = (x − μ) / σ with σ² = mean ‖x − μ‖² over the fit items,
    so the reconstruction loss reads as a share of variance. `rqkmeans` has no encoder (the
    quantizer works on x' itself).
    """

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        if cfg.content_dim < 1:
            raise ValueError(f"SIDModel: content_dim must be set (>= 1), got {cfg.content_dim}")
        self.cfg = cfg
        dim = cfg.content_dim
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(()))
        latent = cfg.latent if cfg.neural else dim
        neural = cfg.neural
        self.encoder: nn.Module = Encoder(dim, cfg.hidden, cfg.latent) if neural else nn.Identity()
        self.decoder: nn.Module | None = Decoder(dim, cfg.hidden, cfg.latent) if neural else None
        self.quantizer = ResidualQuantizer(cfg.levels, cfg.codebook_size, latent, cfg.beta,
                                           ema=cfg.ema, decay=cfg.ema_decay)
        self.tower_f = mlp([latent, cfg.tower_dim, cfg.tower_dim]) if cfg.contrastive else None
        self.tower_g = mlp([latent, cfg.tower_dim, cfg.tower_dim]) if cfg.contrastive else None

    @torch.no_grad()
    def set_standardization(self, content: torch.Tensor) -> None:
        """Set μ and σ from the fit items' raw content."""
        content = content.float()
        self.mean.copy_(content.mean(dim=0))
        self.scale.copy_((content - self.mean).pow(2).sum(dim=1).mean().sqrt().clamp_min(1e-8))

    def standardize(self, content: torch.Tensor) -> torch.Tensor:
        """x' = (x − μ) / σ."""
        return (content.float() - self.mean) / self.scale

    @torch.no_grad()
    def codes(self, content: torch.Tensor) -> torch.Tensor:
        """(n, L) int64 codes of raw content rows (fp32, no usage counting)."""
        return self.quantizer.codes(self.encoder(self.standardize(content)).float())

    def losses(self, batch: Batch, progress: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(total loss, {term: detached value, plus pair statistics}) of one batch.

        `progress` ∈ [0, 1] is the share of training done (AdaSID's schedule).
        """
        cfg = self.cfg
        z = self.encoder(batch.x)
        q = self.quantizer(z)
        x_hat = self.decoder(q.quantized)
        terms = {"rec": L.reconstruction_loss(x_hat, batch.x), "rq": q.loss}
        stats: dict[str, torch.Tensor] = {}
        total = terms["rec"] + terms["rq"]
        rows = batch.rows
        if cfg.hamr or cfg.uniform:
            ham = L.hamming(q.codes)
        if cfg.hamr or cfg.adasid:
            cos = batch.unit @ batch.unit.T
        if cfg.hamr:
            cv = L.cvpm_mask(rows, ham, cos, batch.positive, cfg.tau_dup, cfg.max_hamming)
            terms["hamr"] = L.hamr_loss(z, ham, cfg.levels, cv.mask, cfg.hamr_margin,
                                        cfg.hamr_gamma)
            total = total + cfg.hamr_weight * terms["hamr"]
            stats["cvpm_excluded"] = cv.excluded
            stats["valid_pairs"] = cv.mask.sum()
        if cfg.uniform or cfg.adasid:
            distinct = rows[:, None] != rows[None, :]
        if cfg.uniform:
            mask = distinct & (ham <= cfg.uniform_h_max)
            terms["uniform"] = L.uniform_repulsion_loss(z, mask, cfg.uniform_margin)
            total = total + cfg.uniform_weight * terms["uniform"]
            stats["uniform_pairs"] = mask.sum()
        if cfg.adasid:
            weights = L.adasid_weights(q.codes, cos, batch.positive, distinct)
            rho = L.adasid_schedule(progress, cfg.rho_end)
            terms["adasid"] = L.adasid_loss(z, weights, rho, cfg.adasid_margin)
            total = total + cfg.adasid_weight * terms["adasid"]
        if cfg.contrastive:
            f = self.tower_f(q.quantized)
            g = self.tower_g(q.quantized)
            anchor_rows = rows[batch.anchor]
            allowed = (anchor_rows[:, None] != rows[None, :]) & ~batch.positive[batch.anchor]
            terms["contrastive"] = L.info_nce(f, g, batch.anchor, batch.target, allowed,
                                              batch.pair_weight, cfg.tau)
            total = total + cfg.contrastive_weight * terms["contrastive"]
            stats["contrastive_pairs"] = batch.pair_weight.sum()
        terms = {k: v.detach() for k, v in terms.items()}
        terms["total"] = total.detach()
        return total, {**terms, **stats}


class Tokenizer:
    """Fit on items (and their positives), encode any item from content, save and load."""

    def __init__(self, config: TokenizerConfig):
        self.config = config
        self.model: SIDModel | None = None

    @property
    def name(self) -> str:
        """The registry name."""
        return self.config.name

    def _build(self, content_dim: int) -> SIDModel:
        self.config = replace(self.config, content_dim=content_dim)
        # the weights' init depends on the seed alone, not on the global RNG
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.train.seed)
            self.model = SIDModel(self.config)
        return self.model

    def fit(self, content: np.ndarray, pairs: np.ndarray | None = None, *, device: str = "cpu",
            checkpoint: Path | None = None, progress: bool = False, callback=None) -> dict:
        """Train on `content` (n, d) with positive `pairs` ((m, 2) rows into content).

        Returns the training history (`epochs`: per-epoch losses and SID metrics). With a
        `checkpoint` path, progress is saved there and a matching checkpoint is resumed.
        `callback(record)` is called after each epoch.
        """
        content = np.asarray(content, dtype=np.float32)
        if content.ndim != 2 or content.shape[0] < 2:
            raise ValueError(f"Tokenizer.fit: content must be (n_items >= 2, dim), got "
                             f"{content.shape}")
        if not np.isfinite(content).all():
            raise ValueError("Tokenizer.fit: content holds NaN or inf")
        model = self._build(content.shape[1]).to(device)
        pairs = np.zeros((0, 2), dtype=np.int64) if pairs is None else np.asarray(pairs, np.int64)
        x = torch.tensor(content, device=device)
        model.set_standardization(x)
        generator = torch.Generator().manual_seed(self.config.train.seed)
        if not self.config.neural:
            model.quantizer.init_kmeans(model.standardize(x), generator, self.config.kmeans_iters)
            return {"epochs": []}
        return fit_model(model, x, pairs, self.config, generator, device=device,
                         checkpoint=checkpoint, progress=progress, callback=callback)

    def encode(self, content: np.ndarray, *, device: str | None = None,
               batch_size: int = 65_536) -> np.ndarray:
        """(n, L) int64 codes of raw content rows; works for items never seen in training."""
        model = self._fitted()
        device = device or str(next(iter(model.buffers())).device)
        model = model.to(device).eval()
        content = np.asarray(content, dtype=np.float32)
        if content.ndim != 2 or content.shape[1] != self.config.content_dim:
            raise ValueError(f"Tokenizer.encode: content must be (n, {self.config.content_dim}), "
                             f"got {content.shape}")
        out = [model.codes(torch.tensor(content[s:s + batch_size], device=device)).cpu()
               for s in range(0, len(content), batch_size)]
        codes = torch.cat(out) if out else torch.zeros((0, self.config.levels), dtype=torch.int64)
        return codes.numpy()

    def _fitted(self) -> SIDModel:
        if self.model is None:
            raise RuntimeError(f"tokenizer {self.name!r} is not fitted (call fit or load)")
        return self.model

    def save(self, folder: str | Path) -> Path:
        """Write `tokenizer.pt` (weights + config) and `tokenizer.json` (config) into `folder`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.cpu() for k, v in self._fitted().state_dict().items()}
        save_atomic({"config": self.config.to_dict(), "state": state}, folder / MODEL_FILE)
        write_text_atomic(json.dumps(self.config.to_dict(), indent=2, sort_keys=True) + "\n",
                          folder / CONFIG_FILE)
        return folder

    @classmethod
    def load(cls, folder: str | Path, device: str = "cpu") -> Tokenizer:
        """Read a tokenizer written by `save` (its config travels with the weights)."""
        path = Path(folder) / MODEL_FILE
        if not path.exists():
            raise FileNotFoundError(f"{path}: no saved tokenizer (expected {MODEL_FILE} from "
                                    f"Tokenizer.save)")
        blob = torch.load(path, map_location=device, weights_only=True)
        tok = cls(TokenizerConfig.from_dict(blob["config"]))
        tok.model = SIDModel(tok.config).to(device)
        tok.model.load_state_dict(blob["state"])
        tok.model.eval()
        return tok


def make_tokenizer(name: str, overrides: dict | None = None) -> Tokenizer:
    """A fresh tokenizer from the registry (see `tokenizer_config` for overrides)."""
    return Tokenizer(tokenizer_config(name, overrides))

