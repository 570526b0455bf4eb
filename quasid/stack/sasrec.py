"""SASRec (Kang & McAuley 2018): the ID-based next-item baseline of the offline benchmark.

The model a user would pick instead of SIDs: one embedding per item (row of the catalog
sorted by item id), shared by the input and the output layer, plus a learned position
embedding; a pre-norm causal Transformer over the user's items (left-padded, newest last);
the state at position t scores every item as <h_t, e_item> for the item at t + 1.

- **Positions** count from the request's first real item (0, 1, ...; capped at
  `max_history` - 1), so a position's output depends on its own item and the earlier ones
  only: it is the same with any amount of left padding and whatever comes later.
- **Training** (`fit_sasrec`, on the shared `quasid.stack.training.train_epochs` loop): per
  user, the last `max_history` + 1 training items (the paper's truncation); every position
  predicts the next item. `loss="full"`: softmax cross-entropy over the whole known catalog
  (the strong modern variant); `loss="sampled"`: the paper's binary cross-entropy of the
  next item against `negatives` items per position drawn uniformly from the known catalog.
  Mean over the predicted positions. AdamW with linear warm-up then cosine decay to
  `lr_floor` (1: constant, the paper's); weight decay on the Transformer's matrices only.
  Early stopping on validation HR@10 over the full item set (each user's second-to-last
  item, never the test item): the best epoch's weights are kept.
- **Cold items** (no training interactions) are unknown at training time: they are no
  target, no input and no negative, and take no weight decay, so their embeddings stay
  exactly at their random initialization (N(0, 0.02^2) per coordinate). At serving they are
  scored like any other item with that vector (the benchmark ranks the full item set): what
  a SASRec deployed before they arrived would do. Their HR@10 is measured, not assumed.

`SasrecRecommender` serves it (`quasid.core.recommender.Recommender`: item ids in, the top
`k` items by score out, their logits as scores), saves and loads like
`quasid.stack.serving.Stack`; `train_sasrec` trains one from training interactions.

**With transition counts** (`SasrecConfig.transitions` set; the offline benchmark's name
`sasrec+transitions`): the score of item b is logit_b + v * log p_T(b | history), with
p_T the SID stack's smoothed back-off transition probability
(`quasid.stack.transitions.FollowerTable`, the same counts on the same training part) and v
fitted over `transitions.weight_grid` on the validation requests by NDCG@10, as the stack
fits its own. The fair opponent of a stack that blends the same counts.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl
import torch
from pydantic import model_validator
from torch import nn
from torch.nn import functional as F

from quasid.core.config import Config, merge
from quasid.core.io import write_atomic
from quasid.core.recommender import PAD
from quasid.core.schedule import lr_factor
from quasid.core.schemas import ContractError
from quasid.data.sequences import row_mapper, sample_windows, sequence_windows
from quasid.stack.config import TransitionConfig
from quasid.stack.metrics import hit_ndcg
from quasid.stack.retriever import feed_forward
from quasid.stack.training import History, autocast, train_epochs
from quasid.stack.transitions import FollowerTable

NAME = "sasrec"
"""The recommender's name, and the "tokenizer" name that selects it in the offline benchmark."""
TRANSITIONS_NAME = "sasrec+transitions"
"""The name of SASRec blended with transition counts (`SasrecConfig.transitions` set)."""

INIT_STD = 0.02
"""Standard deviation of the item and position embeddings at initialization."""


class SasrecConfig(Config):
    """SASRec's size, loss and schedule.

    Defaults, chosen before tuning for Amazon Beauty (12k items, ~9 interactions per user) on
    a GPU: the paper's max history 50, 2 blocks, batch 128, lr 1e-3 and dropout 0.5 (its
    choice for the sparse Amazon sets) at width 64 with full-softmax cross-entropy; the epoch
    count is a ceiling that early stopping cuts. `benchmarks/tuning.py --model sasrec` searches them
    on the validation split.
    """

    d_model: int = 64
    n_heads: int = 2
    n_layers: int = 2
    """Transformer blocks (0: no attention, each position sees its own item only)."""
    d_ff: int = 256
    dropout: float = 0.5
    max_history: int = 50
    epochs: int = 200
    batch_size: int = 128
    lr: float = 1e-3
    lr_floor: float = 1.0
    """Share of `lr` the cosine decay ends at after `epochs` (1: constant after warm-up)."""
    weight_decay: float = 0.0
    warmup: int = 100
    """Linear warm-up steps."""
    grad_clip: float | None = 1.0
    patience: int | None = 10
    """Early stopping: validation HR@10 after each epoch, the best epoch's weights kept,
    stop after this many epochs without a gain (None: no validation, run all epochs)."""
    valid_requests: int | None = None
    """Validation requests scored per epoch (a seeded sample; None: all)."""
    loss: Literal["full", "sampled"] = "full"
    negatives: int = 1
    """Sampled negatives per position (`loss="sampled"`; the paper: 1)."""
    exclude_history: bool = False
    """Never recommend an item already in the request's history (off, like the SID stack)."""
    serve_batch: int = 1024
    """Requests per device batch when scoring."""
    transitions: TransitionConfig | None = None
    """Transition counts blended into the score (logit + `transitions.weight` * log p_T, the
    weight fitted over `transitions.weight_grid` on validation requests); `candidates` does
    not apply, since every item is scored. None: plain SASRec."""

    @model_validator(mode="after")
    def _valid(self) -> SasrecConfig:
        checks = {
            "d_model": (self.d_model >= 1 and self.n_heads >= 1
                        and self.d_model % self.n_heads == 0,
                        f"a positive multiple of n_heads ({self.n_heads})"),
            "n_heads": (self.n_heads >= 1, ">= 1"), "n_layers": (self.n_layers >= 0, ">= 0"),
            "d_ff": (self.d_ff >= 1, ">= 1"), "dropout": (0 <= self.dropout < 1, "in [0, 1)"),
            "max_history": (self.max_history >= 1, ">= 1"), "epochs": (self.epochs >= 1, ">= 1"),
            "batch_size": (self.batch_size >= 1, ">= 1"), "lr": (self.lr > 0, "> 0"),
            "lr_floor": (0 <= self.lr_floor <= 1, "in [0, 1]"),
            "weight_decay": (self.weight_decay >= 0, ">= 0"), "warmup": (self.warmup >= 0, ">= 0"),
            "grad_clip": (self.grad_clip is None or self.grad_clip > 0, "> 0 or None"),
            "patience": (self.patience is None or self.patience >= 1, ">= 1 or None"),
            "valid_requests": (self.valid_requests is None or self.valid_requests >= 1,
                               ">= 1 or None"),
            "negatives": (self.negatives >= 1, ">= 1"),
            "serve_batch": (self.serve_batch >= 1, ">= 1"),
        }
        bad = [f"{k}={getattr(self, k)!r} (expected {want})" for k, (ok, want) in checks.items()
               if not ok]
        if bad:
            raise ValueError("SasrecConfig: " + "; ".join(bad))
        return self


def sasrec_config(overrides: Mapping[str, Any] | None = None) -> SasrecConfig:
    """`SasrecConfig` with `overrides` merged in; unknown keys or bad values raise `ConfigError`."""
    return merge(SasrecConfig(), overrides, "sasrec overrides")


class CausalBlock(nn.Module):
    """Pre-norm Transformer block whose attention follows a given (B, T, T) mask."""

    def __init__(self, d_model: int, heads: int, d_ff: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.ff = feed_forward(d_model, d_ff, dropout)
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x: (B, T, d); mask: (B, T, T) True where query t may attend to key s."""
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(
            2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None],
                                           dropout_p=self.dropout if self.training else 0.0)
        x = x + self.drop(self.out(y.transpose(1, 2).reshape(b, t, d)))
        return x + self.drop(self.ff(self.norm2(x)))


class Sasrec(nn.Module):
    """The SASRec network over item rows 0 .. n_items - 1 (PAD = -1)."""

    def __init__(self, n_items: int, warm: np.ndarray, cfg: SasrecConfig = SasrecConfig()):
        """warm: (n_items,) True for items with training interactions (the catalog known at
        training time: the only targets and negatives)."""
        super().__init__()
        warm = np.asarray(warm, dtype=bool)
        if warm.shape != (n_items,) or not warm.any():
            raise ValueError(f"warm: expected ({n_items},) booleans with at least one True, got "
                             f"shape {warm.shape} with {int(warm.sum())} True")
        self.cfg = cfg
        self.n_items = n_items
        d = cfg.d_model
        # the extra last row is the padding item: zero, never trained, never scored
        self.item_emb = nn.Embedding(n_items + 1, d, padding_idx=n_items)
        self.pos_emb = nn.Embedding(cfg.max_history, d)
        with torch.no_grad():
            nn.init.normal_(self.item_emb.weight, std=INIT_STD)
            self.item_emb.weight[n_items].zero_()
            nn.init.normal_(self.pos_emb.weight, std=INIT_STD)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(CausalBlock(d, cfg.n_heads, cfg.d_ff, cfg.dropout)
                                    for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(d)
        self.register_buffer("warm", torch.as_tensor(warm), persistent=False)
        # added to training logits: unknown (cold) items take no part in the softmax
        self.register_buffer("train_mask", torch.where(self.warm, 0.0, -math.inf), persistent=False)
        self.register_buffer("warm_rows", torch.nonzero(self.warm).squeeze(1), persistent=False)

    def hidden(self, rows: torch.Tensor) -> torch.Tensor:
        """States (B, T, d) of left-padded item-row sequences (B, T), one per position."""
        real = rows >= 0
        pos = (real.cumsum(dim=1) - 1).clamp(0, self.cfg.max_history - 1)
        x = self.drop(self.item_emb(torch.where(real, rows, self.n_items)) + self.pos_emb(pos))
        t = rows.shape[1]
        eye = torch.eye(t, dtype=torch.bool, device=rows.device)
        # causal, real keys only; every query also sees itself, so a padding query (whose
        # output is never used) still has a key and the softmax stays finite
        mask = (torch.ones_like(eye).tril()[None] & real[:, None, :]) | eye[None]
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x)

    def item_logits(self, states: torch.Tensor) -> torch.Tensor:
        """<state, e_item> for every item: (..., n_items)."""
        return F.linear(states, self.item_emb.weight[: self.n_items])

    def user_states(self, histories: torch.Tensor) -> torch.Tensor:
        """The last position's state (B, d) of item-row histories (B, H), -1 padded, newest last."""
        return self.hidden(_trim(histories[:, -self.cfg.max_history:])[0])[:, -1]

    def scores(self, histories: torch.Tensor) -> torch.Tensor:
        """Float32 logits (B, n_items) of every item as each request's next item."""
        states = self.user_states(histories)
        # the ranking's matmul in fp32 even under autocast: bf16 logits (8 mantissa bits) would
        # tie neighbouring items of a 12k catalog and reorder the top-K
        with torch.autocast(states.device.type, enabled=False):
            return F.linear(states.float(), self.item_emb.weight[: self.n_items].float())

    def top_k(self, histories: torch.Tensor, k: int, extra: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows (B, k), scores (B, k)) of the best items by logit (plus `extra` (B, n_items)
        when given), best first; with `exclude_history` the items of the history are left out."""
        scores = self.scores(histories)
        return self.select(scores if extra is None else scores + extra, histories, k)

    def select(self, scores: torch.Tensor, histories: torch.Tensor, k: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """`top_k` of given scores (B, n_items) of the requests `histories` (B, H)."""
        if self.cfg.exclude_history:
            # PAD goes to an extra column that is dropped again, so it hides no real item
            col = torch.where(histories >= 0, histories, self.n_items)
            scores = F.pad(scores, (0, 1)).scatter(1, col, -math.inf)[:, : self.n_items]
        top, rows = scores.topk(k, dim=1)
        return rows, top

    def loss(self, inputs: torch.Tensor, targets: torch.Tensor,
             negatives: torch.Tensor | None = None) -> torch.Tensor:
        """Mean next-item loss over the positions with a target (targets >= 0).

        inputs, targets: (B, T) item rows, targets[:, t] the item after inputs[:, t] (PAD
        where none). Full softmax over the warm items when `negatives` is None, else binary
        cross-entropy of the target against `negatives` (B, T, m) item rows:
        softplus(-s_target) + sum_j softplus(s_neg_j) (a negative may be the target itself, 1
        in n_warm per draw: the paper redraws items of the sequence, this sampler does not).
        """
        inputs, targets, negatives = _trim(inputs, targets, negatives)
        keep = targets >= 0
        states = self.hidden(inputs)[keep]  # (M, d): only the predicted positions
        target = targets[keep]
        if negatives is None:
            logits = self.item_logits(states).float() + self.train_mask
            return F.cross_entropy(logits, target)
        emb = self.item_emb.weight
        pos = (states * emb[target]).sum(-1).float()
        neg = torch.einsum("md,mjd->mj", states, emb[negatives[keep]]).float()
        return (F.softplus(-pos) + F.softplus(neg).sum(-1)).mean()


def _trim(first: torch.Tensor, *others: torch.Tensor | None) -> tuple:
    """Drop the leading columns that are padding in every row of `first` (at least one
    column stays) from `first` and the same columns from each of `others` (None passes)."""
    longest = int((first >= 0).sum(dim=1).max()) if first.numel() else 0
    start = first.shape[1] - max(1, longest)
    return (first[:, start:], *(o if o is None else o[:, start:] for o in others))


def training_sequences(train: pl.DataFrame, rows_of, max_history: int
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Per user with at least two training interactions: (inputs, targets), both
    (n_users, max_history) item rows left-padded with PAD: the last `max_history` + 1 items in
    (ts, item_id) order, inputs = all but the last, targets = all but the first."""
    hist, items, _, is_last = sequence_windows(train, max_history)
    hist, items = rows_of(hist[is_last]), rows_of(items[is_last])
    nxt = np.concatenate([hist[:, 1:], items[:, None]], axis=1)
    targets = np.where(hist >= 0, nxt, PAD)
    keep = hist[:, -1] >= 0
    return hist[keep], targets[keep]


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on the Transformer's matrices only. Embeddings take none, so an
    item without gradient (a cold item) keeps its initial vector exactly."""
    decay, plain = [], []
    for name, p in model.named_parameters():
        matrix = p.ndim == 2 and not name.startswith(("item_emb", "pos_emb"))
        (decay if matrix else plain).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": plain, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def fit_sasrec(model: Sasrec, inputs: np.ndarray, targets: np.ndarray, *, seed: int = 0,
               valid: tuple[np.ndarray, np.ndarray] | None = None, progress=None) -> History:
    """Train on `training_sequences` (inputs, targets); returns the training `History`.

    `valid` = (history rows, target rows) of validation requests: with `cfg.patience` set,
    each epoch ends with their HR@10 over the full item set (`hit_rate`, a seeded sample of
    `cfg.valid_requests`) and training stops early, keeping the best epoch's weights.
    Seeded: batch order, negatives (drawn from a `seed` generator) and dropout
    (`torch.manual_seed(seed)`). `progress(epoch, loss[, score])` after each epoch.
    """
    cfg = model.cfg
    device = next(model.parameters()).device
    inputs, targets = np.asarray(inputs, dtype=np.int64), np.asarray(targets, dtype=np.int64)
    if inputs.ndim != 2 or inputs.shape != targets.shape or len(inputs) == 0:
        raise ValueError(f"inputs {inputs.shape} / targets {targets.shape}: expected two equal, "
                         "non-empty (n, T) matrices")
    x = torch.as_tensor(inputs, device=device)
    y = torch.as_tensor(targets, device=device)
    n = len(x)
    total = max(1, math.ceil(n / cfg.batch_size)) * cfg.epochs
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, total, cfg.warmup, cfg.lr_floor))
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout draws
    validate = None
    if cfg.patience is not None:
        if valid is None:
            raise ValueError("sasrec.patience is set: expected validation requests to stop on")
        v_hist, v_tgt = sample_windows(*valid, cfg.valid_requests, seed)
        validate = lambda: hit_rate(model, v_hist, v_tgt)  # noqa: E731
    setup = None
    if cfg.loss == "sampled":
        pool = model.warm_rows
        setup = lambda: pool[torch.randint(len(pool), (n, x.shape[1], cfg.negatives),  # noqa: E731
                                           generator=gen).to(device)]

    def batch_loss(idx: torch.Tensor, negatives: torch.Tensor | None) -> torch.Tensor:
        return model.loss(x[idx], y[idx], None if negatives is None else negatives[idx])

    return train_epochs(model, batch_loss, inputs, cfg.batch_size, cfg.epochs, opt, sched, gen,
                        grad_clip=cfg.grad_clip, epoch_setup=setup, progress=progress,
                        validate=validate, patience=cfg.patience)


@torch.inference_mode()
def hit_rate(model: Sasrec, histories: np.ndarray, targets: np.ndarray, k: int = 10) -> float:
    """HR@k over the full item set of requests given as (history rows (n, H), target rows
    (n,)), ranked as served (`Sasrec.top_k`): the early-stopping score."""
    if len(targets) == 0:
        return float("nan")
    device = next(model.parameters()).device
    hits, step = 0, model.cfg.serve_batch
    for s in range(0, len(targets), step):
        hist = torch.as_tensor(histories[s:s + step], dtype=torch.int64, device=device)
        tgt = torch.as_tensor(targets[s:s + step], dtype=torch.int64, device=device)
        with autocast(device):
            rows, _ = model.top_k(hist, k)
        hits += int((rows == tgt[:, None]).any(dim=1).sum())
    return hits / len(targets)


class SasrecRecommender:
    """A trained SASRec behind the `quasid.core.recommender.Recommender` interface."""

    def __init__(self, item_ids: np.ndarray, model: Sasrec, device: str = "cpu",
                 transitions: FollowerTable | None = None):
        """item_ids: (n_items,) sorted item ids; row r of the model is item_ids[r];
        transitions: the training logs' follower counts over the same rows (needed when
        `model.cfg.transitions` is set, and only then)."""
        if (transitions is None) != (model.cfg.transitions is None):
            raise ValueError("SasrecRecommender: expected a FollowerTable exactly when the "
                             f"config's transitions are set (transitions={model.cfg.transitions})")
        self.name = NAME if transitions is None else TRANSITIONS_NAME
        self.item_ids = np.array(item_ids, dtype=np.int64)
        if len(self.item_ids) != model.n_items or (np.diff(self.item_ids) <= 0).any():
            raise ValueError(f"item_ids: expected {model.n_items} strictly increasing ids (the "
                             f"model's rows), got {len(self.item_ids)}")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.cfg = model.cfg
        self.transitions = None if transitions is None else transitions.to(self.device)
        self._ids = torch.as_tensor(self.item_ids, device=self.device)
        self._rows_of = row_mapper(self.item_ids, "histories")

    @property
    def n_items(self) -> int:
        """Catalog size."""
        return len(self.item_ids)

    def rows_of(self, item_ids: np.ndarray) -> np.ndarray:
        """Rows of item ids (PAD stays PAD); unknown ids raise `ContractError` (a ValueError)."""
        return self._rows_of(item_ids)

    @torch.inference_mode()
    def recommend(self, histories: np.ndarray, k: int, users: np.ndarray | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
        """The `k` best items per request by logit: (item ids (n, k) int64, logits (n, k)
        float32), best first, no repeats. histories: (n, H) item ids left-padded with PAD;
        `users` is not used (the model knows a user by their items only)."""
        histories = np.asarray(histories, dtype=np.int64)
        if histories.ndim != 2:
            raise ValueError(f"histories: expected an (n, H) matrix, got shape {histories.shape}")
        if not 1 <= k <= self.n_items:
            raise ValueError(f"k={k}: expected 1 <= k <= the catalog size ({self.n_items})")
        items, scores = [], []
        weight = 0.0 if self.transitions is None else self.cfg.transitions.weight
        for hist, log_t in self._batches(histories):
            with autocast(self.device):
                top, score = self.model.top_k(hist, k, None if log_t is None else weight * log_t)
            items.append(self._ids[top])
            scores.append(score)
        if not items:
            return np.zeros((0, k), dtype=np.int64), np.zeros((0, k), dtype=np.float32)
        return (torch.cat(items).cpu().numpy().astype(np.int64),
                torch.cat(scores).float().cpu().numpy().astype(np.float32))

    def _batches(self, histories: np.ndarray):
        """(row histories (b, H) on the device, log p_T of every item (b, n_items) or None
        without counts) per `serve_batch` requests of id histories (n, H)."""
        rows = self.rows_of(histories[:, -self.cfg.max_history:])
        # the counts look at the newest items only, which the truncation above keeps
        for s in range(0, len(rows), self.cfg.serve_batch):
            hist = torch.as_tensor(rows[s:s + self.cfg.serve_batch], device=self.device)
            log_t = (None if self.transitions is None
                     else self.transitions.request(hist).log_p_all(self.n_items))
            yield hist, log_t

    @torch.inference_mode()
    def fit_transition_weight(self, histories: np.ndarray, targets: np.ndarray, k: int = 10
                              ) -> dict[float, float]:
        """Set `transitions.weight` to the `transitions.weight_grid` value with the best
        NDCG@k on (history ids, target ids) requests (validation, never test); returns
        {weight: NDCG@k}, ties to the earlier value. Each batch is scored once for all values."""
        if self.transitions is None:
            raise ValueError("fit_transition_weight: this SASRec has no transition counts "
                             "(SasrecConfig.transitions is None)")
        histories = np.asarray(histories, dtype=np.int64)
        grid = self.cfg.transitions.weight_grid
        ranked: dict[float, list[torch.Tensor]] = {w: [] for w in grid}
        for hist, log_t in self._batches(histories):
            with autocast(self.device):
                logits = self.model.scores(hist)
            for w in grid:  # the ranking `recommend` serves with weight w
                ranked[w].append(self.model.select(logits + w * log_t, hist, k)[0])
        targets = np.asarray(targets)
        found = {w: float(hit_ndcg(self.item_ids[torch.cat(r).cpu().numpy()], targets, ks=(k,))
                          [f"ndcg@{k}"].mean()) for w, r in ranked.items()}
        best = max(grid, key=lambda w: found[w])  # max keeps the first of ties
        self.cfg = merge(self.cfg, {"transitions": {"weight": best}}, "fit_transition_weight")
        self.model.cfg = self.cfg
        return found

    def save(self, path: str | Path) -> Path:
        """Write the model to one file (config, item table, warm flags, weights, transition
        counts when present), atomically."""
        state = {
            "format": 1,
            "name": NAME,
            "config": json.dumps(self.cfg.model_dump()),
            "item_ids": torch.as_tensor(self.item_ids),
            "warm": self.model.warm.cpu(),
            "model": {k: v.cpu() for k, v in self.model.state_dict().items()},
        }
        if self.transitions is not None:
            state["transitions"] = self.transitions.state_dict()
        return write_atomic(Path(path), lambda fh: torch.save(state, fh))

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> SasrecRecommender:
        """Read a model written by `save`."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no saved SASRec (expected a file written by "
                                    "SasrecRecommender.save)")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("name") != NAME:
            raise ContractError(f"{path}: not a saved SASRec (name {state.get('name')!r})")
        cfg = SasrecConfig.model_validate_json(state["config"])
        item_ids = state["item_ids"].numpy()
        model = Sasrec(len(item_ids), state["warm"].numpy(), cfg)
        model.load_state_dict(state["model"])
        transitions = state.get("transitions")
        return cls(item_ids, model, device,
                   None if transitions is None else FollowerTable.from_state_dict(transitions))


def train_sasrec(
    items: pl.DataFrame,
    train: pl.DataFrame,
    cfg: SasrecConfig = SasrecConfig(),
    *,
    device: str = "cpu",
    seed: int = 0,
    valid: tuple[np.ndarray, np.ndarray] | None = None,
    progress: bool = False,
) -> tuple[SasrecRecommender, dict]:
    """Train SASRec over the catalog `items` on `train` interactions: (recommender, summary).

    `valid` = (history ids, target ids) of validation requests, for early stopping (needed
    when `cfg.patience` is set) and, with `cfg.transitions`, the transition weight's fit
    (`SasrecRecommender.fit_transition_weight`; without `valid` the configured weight stays).
    `progress`: log each epoch to stderr, as `train_stack` does. The summary holds the config
    (the fitted weight in it), the counts, the training history, the weight fit and the times.
    Same seed, same data: the same weights.
    """
    from quasid.stack.build import _epoch_logger
    item_ids = np.sort(items["item_id"].to_numpy().astype(np.int64))
    rows_of = row_mapper(item_ids, "training interactions")
    inputs, targets = training_sequences(train, rows_of, cfg.max_history)
    if len(inputs) == 0:
        raise ContractError("training interactions: no user has two (expected sequences to "
                            "train SASRec on)")
    popularity = np.bincount(rows_of(train["item_id"].to_numpy()), minlength=len(item_ids))
    warm = popularity > 0
    start = time.perf_counter()
    torch.manual_seed(seed)  # the initial weights
    model = Sasrec(len(item_ids), warm, cfg).to(device)
    valid_rows = None if valid is None else (rows_of(valid[0]), rows_of(valid[1]))
    history = fit_sasrec(model, inputs, targets, seed=seed, valid=valid_rows,
                         progress=_epoch_logger(NAME, cfg.epochs, progress))
    timings = {"train_s": round(time.perf_counter() - start, 2)}
    transitions = weight_fit = None
    if cfg.transitions is not None:
        start = time.perf_counter()
        transitions = FollowerTable.from_config(train, rows_of, popularity, cfg.transitions)
    recommender = SasrecRecommender(item_ids, model, device, transitions)
    if transitions is not None:
        if valid is not None:
            weight_fit = [{"transition_weight": w, "ndcg@10": v}
                          for w, v in recommender.fit_transition_weight(*valid).items()]
        timings["transitions_s"] = round(time.perf_counter() - start, 2)
    summary = {
        "model": recommender.name,
        "seed": seed,
        "device": str(device),
        "config": recommender.cfg.model_dump(),
        "counts": {"items": len(item_ids), "warm_items": int(warm.sum()),
                   "train_interactions": train.height, "sequences": len(inputs),
                   "train_positions": int((targets >= 0).sum())},
        "training": history.summary(),
        "timings": timings,
    }
    if cfg.transitions is not None:
        summary["transition_weight"] = recommender.cfg.transitions.weight
        summary["weight_fit_ndcg@10"] = weight_fit
    return recommender, summary
