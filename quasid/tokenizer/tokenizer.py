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
L = L_rec + L_rq + λ_h HaMR + λ_c InfoNCE + λ_a AdaSID + λ_u Uniform (see `quasid.tokenizer.losses`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from quasid.core.config import merge
from quasid.core.io import write_atomic, write_text_atomic
from quasid.core.layout import CONFIG_FILE, MODEL_FILE
from quasid.tokenizer.config import TokenizerConfig, tokenizer_config
from quasid.tokenizer.fit import fit_model
from quasid.tokenizer.model import SIDModel

"""The registry: tokenizer name -> the config fields it sets."""


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
        self.config = merge(self.config, {"content_dim": content_dim}, "tokenizer")
        # the weights' init depends on the seed alone, not on the global RNG
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.train.seed)
            self.model = SIDModel(self.config)
        return self.model

    def fit(self, content: np.ndarray, pairs: np.ndarray | None = None, *, device: str = "cpu",
            checkpoint: Path | None = None, progress: bool = False, callback=None,
            probe=None) -> dict:
        """Train on `content` (n, d) with positive `pairs` ((m, 2) rows into content).

        Returns the training history (`epochs`: per-epoch losses and SID metrics). With a
        `checkpoint` path, progress is saved there and a matching checkpoint is resumed.
        `callback(record)` is called after each epoch; a `probe` (`diagnostics.PairProbe`,
        built on the same rows) adds its statistics to each epoch's record.
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
                         checkpoint=checkpoint, progress=progress, callback=callback, probe=probe)

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
        blob = {"config": self.config.to_dict(), "state": state}
        write_atomic(folder / MODEL_FILE, lambda fh: torch.save(blob, fh))
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
