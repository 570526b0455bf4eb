"""SID ranker: scores (user history, candidate item) pairs from SID-token features.

Item representation: the sum of one embedding per SID level (each level its own table)
plus an item-ID embedding that only warm items (those with training interactions) have:
a cold item is represented by its SID tokens alone, which is what lets the ranker score
items it never saw. During training each item's ID embedding is hidden with probability
`id_dropout`, so the SID embeddings learn to carry the item on their own. Each item also
gets a bias built the same way (per-level biases + an ID bias for warm items).

User representation: a small Transformer encoder over the history's item representations
(left-padded, newest last) followed by a summary token; its output is the user vector.
Logit = <user, item> + item bias; trained with binary cross-entropy on the logged next item
(label 1) against uniformly sampled warm items (label 0), the positive weighing as much as
all negatives together, so sigmoid(logit) is p(order | user, item) on balanced odds (a
propensity comparable across candidates, not a calibrated rate). The GMV-aware score is
p(order) * price ** alpha (alpha = 0: plain p(order)).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from quasid.core.schedule import lr_factor
from quasid.stack.config import RankerConfig
from quasid.stack.retriever import trim_padding
from quasid.stack.training import History, max_batches, optimizer, train_epochs


class Ranker(nn.Module):
    """Scores candidate item rows for a batch of item-row histories."""

    def __init__(self, sid: np.ndarray, warm: np.ndarray, cfg: RankerConfig = RankerConfig()):
        """sid: (n_items, L) semantic SID codes per item row; warm: (n_items,) has training data."""
        super().__init__()
        self.cfg = cfg
        sid = np.asarray(sid, dtype=np.int64)
        vocab = sid.max(axis=0) + 1
        offsets = np.concatenate([[0], np.cumsum(vocab)[:-1]])
        self.register_buffer("sid", torch.from_numpy(sid), persistent=False)
        self.register_buffer("sid_tokens", torch.from_numpy(sid + offsets), persistent=False)
        self.register_buffer("warm", torch.as_tensor(np.asarray(warm, dtype=bool)), persistent=False)
        n_items, n_sid = sid.shape[0], int(vocab.sum())
        d = cfg.d_model
        self.sid_emb = nn.Embedding(n_sid, d)
        self.id_emb = nn.Embedding(n_items, d)
        self.sid_bias = nn.Embedding(n_sid, 1)
        self.id_bias = nn.Embedding(n_items, 1)
        for table in (self.sid_emb, self.id_emb):
            nn.init.normal_(table.weight, std=0.02)
        for table in (self.sid_bias, self.id_bias):
            nn.init.zeros_(table.weight)
        self.pos = nn.Embedding(cfg.max_history + 1, d)
        self.summary = nn.Parameter(torch.zeros(d))
        layer = nn.TransformerEncoderLayer(d, cfg.n_heads, 4 * d, cfg.dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, cfg.n_layers, norm=nn.LayerNorm(d),
                                             enable_nested_tensor=False)

    def _id_keep(self, rows: torch.Tensor) -> torch.Tensor:
        keep = self.warm[rows.clamp(min=0)] & (rows >= 0)
        if self.training and self.cfg.id_dropout > 0:
            keep &= torch.rand(rows.shape, device=rows.device) >= self.cfg.id_dropout
        return keep

    def item_repr(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(vectors (..., d), biases (...)) of item rows; -1 rows give zeros."""
        safe = rows.clamp(min=0)
        keep = self._id_keep(rows)[..., None].float()
        tokens = self.sid_tokens[safe]
        vec = self.sid_emb(tokens).sum(-2) + keep * self.id_emb(safe)
        bias = self.sid_bias(tokens).sum(-2) + keep * self.id_bias(safe)
        valid = (rows >= 0)[..., None].float()
        return vec * valid, (bias * valid)[..., 0]

    def user_repr(self, histories: torch.Tensor) -> torch.Tensor:
        """User vectors (B, d) from item-row histories (B, H), -1 padded, newest last."""
        h = trim_padding(histories[:, -self.cfg.max_history:])
        b, n = h.shape
        vec, _ = self.item_repr(h)
        x = torch.cat([vec, self.summary.expand(b, 1, -1)], dim=1)
        x = x + self.pos(torch.arange(n, -1, -1, device=h.device))[None]
        pad = torch.cat([h < 0, torch.zeros((b, 1), dtype=torch.bool, device=h.device)], dim=1)
        return self.encoder(x, src_key_padding_mask=pad)[:, -1]

    def logits(self, histories: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """Logits (B, N) of candidate rows (B, N) for each request's history."""
        user = self.user_repr(histories)
        vec, bias = self.item_repr(candidates)
        return torch.einsum("bd,bnd->bn", user, vec).float() + bias.float()

    def loss(self, histories: torch.Tensor, targets: torch.Tensor, negatives: torch.Tensor
             ) -> torch.Tensor:
        """Binary cross-entropy: the target (label 1) against sampled negatives (label 0).

        negatives: (B, n) rows per request, or (n,) rows shared by the whole batch (each
        negative's representation computed once, its logits one matrix product)."""
        if negatives.dim() == 1:
            user = self.user_repr(histories)
            pos_vec, pos_bias = self.item_repr(targets)
            neg_vec, neg_bias = self.item_repr(negatives)
            positive = (user * pos_vec).sum(-1).float() + pos_bias.float()
            negative = (user @ neg_vec.T).float() + neg_bias.float()
        else:
            logit = self.logits(histories, torch.cat([targets[:, None], negatives], dim=1))
            positive, negative = logit[:, 0], logit[:, 1:]
        # the positive weighs as much as all negatives together (balanced odds)
        return (F.softplus(-positive) + F.softplus(negative).mean(dim=1)).mean()


def gmv_score(logits: torch.Tensor, price: torch.Tensor, alpha: float = 0.0) -> torch.Tensor:
    """The GMV-aware ranking score p(order) * price ** alpha, with p(order) = sigmoid(logits)."""
    return log_gmv_score(logits, price, alpha).exp()


def log_gmv_score(logits: torch.Tensor, price: torch.Tensor, alpha: float = 0.0) -> torch.Tensor:
    """log(p(order) * price ** alpha): the same order as `gmv_score`, without its underflow to 0
    for very unlikely items (so their order stays exact)."""
    out = F.logsigmoid(logits.float())
    return out + alpha * price.log() if alpha else out


def train_ranker(
    model: Ranker,
    histories: np.ndarray,
    targets: np.ndarray,
    negative_pool: np.ndarray,
    *,
    seed: int = 0,
    progress=None,
) -> History:
    """Train on (history rows (N, H), target row (N,)); negatives drawn uniformly from `negative_pool`.

    Returns the training `History`; `progress` is an optional callable(epoch, loss).
    """
    cfg = model.cfg
    device = next(model.parameters()).device
    hist = torch.as_tensor(histories, dtype=torch.int64, device=device)
    tgt = torch.as_tensor(targets, dtype=torch.int64, device=device)
    pool = torch.as_tensor(negative_pool, dtype=torch.int64, device=device)
    if len(pool) == 0:
        raise ValueError("negative_pool: expected at least one warm item to sample negatives from")
    n = len(tgt)
    opt = optimizer(model, cfg.lr, cfg.weight_decay)
    total = max(1, math.ceil(n / cfg.batch_size)) * cfg.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, total, 0, 0.0))
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout and ID dropout draws
    if cfg.shared_negatives:
        # one row of `negatives` draws per batch, taken in batch order
        rows = max_batches(n, cfg.batch_size)

        def setup():
            return iter(torch.randint(len(pool), (rows, cfg.negatives), generator=gen).to(device))

        def batch_loss(idx, draws):
            return model.loss(hist[idx], tgt[idx], pool[next(draws)])
    else:
        def setup():
            return torch.randint(len(pool), (n, cfg.negatives), generator=gen).to(device)

        def batch_loss(idx, neg_idx):
            return model.loss(hist[idx], tgt[idx], pool[neg_idx[idx]])
    return train_epochs(model, batch_loss, histories, cfg.batch_size, cfg.epochs, opt, sched, gen,
                        progress=progress, epoch_setup=setup)
