"""Generative retrieval over SIDs (TIGER-style): a small encoder-decoder Transformer.

Input: the user's recent items (item rows, left-padded with -1, newest last), each spelled
as its full code (SID levels + collision rank, see `quasid.stack.trie`), one token per level,
followed by an always-present end token (so an empty history still has something to
attend to). Output: the next item's code, one level at a time. Each level has its own
token range in one shared vocabulary (token = level offset + code), so the embedding and
output layers are shared while levels never mix.

Decoding is beam search constrained by the `SidTrie`: at each level a beam may only extend
its prefix with a token that leads to an existing item, so every result is a real item.
Beams of one request share the encoder memory: the decoder folds the beams into the
cross-attention's query axis instead of copying the memory once per beam. Decoding is
incremental (`DecoderState`): each level runs the decoder on the new token alone, against
the cached self-attention keys/values of the prefix and the memory's cross-attention
keys/values projected once, instead of re-running the whole prefix at every level.
The item score is log p(code) = the sum of the per-level log-probabilities (softmax over
the level's full vocabulary, as the model was trained; invalid tokens are then excluded).
`score_items` computes the same number by teacher forcing for any items, the brute-force
reference the beam search (and the incremental `candidate_scores`) is tested against.
"""

from __future__ import annotations

import math
import time
from typing import NamedTuple

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from quasid.core.schedule import lr_factor
from quasid.data.sequences import sample_windows
from quasid.stack.config import RetrieverConfig
from quasid.stack.training import History, autocast, optimizer, train_epochs
from quasid.stack.trie import PAD, SidTrie


class Attention(nn.Module):
    """Multi-head attention with its own head width (`heads` x `head_dim` may differ from the
    model width, as in TIGER's T5: 6 heads of 64 over a 128-wide model), on
    `scaled_dot_product_attention`."""

    def __init__(self, d_model: int, heads: int, head_dim: int, dropout: float):
        super().__init__()
        self.heads, self.head_dim, self.dropout = heads, head_dim, dropout
        self.q = nn.Linear(d_model, heads * head_dim)
        self.kv = nn.Linear(d_model, 2 * heads * head_dim)
        self.out = nn.Linear(heads * head_dim, d_model)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                keep: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        """x: (B, T, d) queries; context: (B, S, d) keys/values (None: x itself);
        keep: (B, S) True where a key takes part (None: all); causal: position t sees <= t."""
        b, t, _ = x.shape
        context = x if context is None else context
        q = self.q(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(context).view(b, -1, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        mask = None if keep is None else keep[:, None, None, :]
        y = attend(q, k, v, mask, causal, self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
           causal: bool = False, dropout: float = 0.0) -> torch.Tensor:
    """softmax(q k^T / sqrt(head_dim)) v over (B, heads, T, head_dim) queries and (B, heads, S,
    head_dim) keys/values; mask: broadcastable to (B, heads, T, S), True = attend; causal:
    query t sees keys <= t (T = S). Every query row must keep at least one key.

    `scaled_dot_product_attention` off the CPU. On the CPU the sequences here (at most ~40
    positions, heads of 16-64) are too short for its flash kernel: two batched matmuls and a
    softmax took a third to a half of its time, forward and backward (benchmarks/README.md).
    """
    if q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                              dropout_p=dropout)
    scores = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    if mask is not None:
        scores = scores.masked_fill(~mask, -math.inf)
    if causal:
        t, s = scores.shape[-2:]
        scores = scores.masked_fill(torch.ones(t, s, dtype=torch.bool, device=q.device).triu(1),
                                    -math.inf)
    weights = torch.softmax(scores, dim=-1)
    if dropout:
        weights = F.dropout(weights, dropout)
    return weights @ v


def feed_forward(d_model: int, d_ff: int, dropout: float) -> nn.Sequential:
    """The position-wise GELU MLP of every layer."""
    return nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Dropout(dropout),
                         nn.Linear(d_ff, d_model))


class EncoderLayer(nn.Module):
    """Pre-norm Transformer encoder layer over the history tokens."""

    def __init__(self, d_model: int, heads: int, head_dim: int, d_ff: int, dropout: float):
        super().__init__()
        self.attn = Attention(d_model, heads, head_dim, dropout)
        self.ff = feed_forward(d_model, d_ff, dropout)
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """x: (B, S, d); keep: (B, S) True for real tokens."""
        x = x + self.drop(self.attn(self.norm1(x), keep=keep))
        return x + self.drop(self.ff(self.norm2(x)))


class DecoderLayer(nn.Module):
    """Pre-norm Transformer decoder layer; its cross-attention serves all beams of a request at once."""

    def __init__(self, d_model: int, heads: int, head_dim: int, d_ff: int, dropout: float):
        super().__init__()
        self.self_attn = Attention(d_model, heads, head_dim, dropout)
        self.cross_attn = Attention(d_model, heads, head_dim, dropout)
        self.ff = feed_forward(d_model, d_ff, dropout)
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(d_model) for _ in range(3))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, memory_keep: torch.Tensor
                ) -> torch.Tensor:
        """x: (B, W, t, d) W beams per request; memory: (B, S, d); memory_keep: (B, S) True = real."""
        b, w, t, d = x.shape
        flat = x.reshape(b * w, t, d)
        flat = flat + self.drop(self.self_attn(self.norm1(flat), causal=True))
        h = self.norm2(flat).reshape(b, w * t, d)
        cross = self.cross_attn(h, memory, keep=memory_keep)
        flat = flat + self.drop(cross.reshape(b * w, t, d))
        flat = flat + self.drop(self.ff(self.norm3(flat)))
        return flat.reshape(b, w, t, d)

    def memory_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The cross-attention's keys and values of the memory (B, S, d): each (B, heads, S, head_dim)."""
        attn = self.cross_attn
        b = memory.shape[0]
        k, v = attn.kv(memory).view(b, -1, 2, attn.heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        return k, v

    def step(self, x: torch.Tensor, past_k: torch.Tensor | None, past_v: torch.Tensor | None,
             cross: tuple[torch.Tensor, torch.Tensor], memory_keep: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One new position per sequence, the same numbers as `forward`'s last position.

        x: (B, W, d) the new positions' inputs; past_k / past_v: (B, W, t, heads, head_dim)
        the self-attention keys/values of each sequence's earlier positions (None at t = 0);
        cross: `memory_kv` of the memory. Returns (output (B, W, d), keys, values with this
        position appended). Causal attention over the prefix needs nothing else: earlier
        positions never attend to later ones, so their cached states stay valid.
        """
        b, w, d = x.shape
        sa = self.self_attn
        h = self.norm1(x)
        q = sa.q(h).view(b, w, sa.heads, sa.head_dim)
        k_new, v_new = sa.kv(h).view(b, w, 2, sa.heads, sa.head_dim).unbind(2)
        k = k_new[:, :, None] if past_k is None else torch.cat([past_k, k_new[:, :, None]], 2)
        v = v_new[:, :, None] if past_v is None else torch.cat([past_v, v_new[:, :, None]], 2)
        # one query over at most depth keys: products and sums (a GEMM of 1 x head_dim rows
        # per (request, beam, head) is all overhead); softmax in fp32 as SDPA does
        att = torch.softmax((q[:, :, None] * k).sum(-1).float() / math.sqrt(sa.head_dim), dim=2)
        y = (att.to(v.dtype)[..., None] * v).sum(2)  # (B, W, heads, head_dim)
        x = x + sa.out(y.reshape(b, w, -1))
        ca = self.cross_attn
        qc = ca.q(self.norm2(x)).view(b, w, ca.heads, ca.head_dim).transpose(1, 2)
        yc = attend(qc, *cross, memory_keep[:, None, None, :])
        x = x + ca.out(yc.transpose(1, 2).reshape(b, w, -1))
        return x + self.ff(self.norm3(x)), k, v


class DecoderState(NamedTuple):
    """The incremental decoder after `t` + 1 positions (BOS + t tokens) of W sequences per request.

    hidden: (B, W, d) the last position's normalized output (what the next level's
    distribution is read from); keys / values: per layer (B, W, t + 1, heads, head_dim);
    cross: per layer the memory's cross-attention keys and values; memory_keep: (B, S).
    """

    hidden: torch.Tensor
    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    cross: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    memory_keep: torch.Tensor


class Retriever(nn.Module):
    """Encoder-decoder over SID tokens, tied to one SID table through its trie."""

    def __init__(self, trie: SidTrie, cfg: RetrieverConfig = RetrieverConfig()):
        super().__init__()
        self.cfg = cfg
        self.trie = trie
        depth = trie.depth
        offsets = np.concatenate([[0], np.cumsum(trie.vocab)]).astype(np.int64)
        self.n_tokens = int(offsets[-1])
        self.pad_token, self.end_token, self.bos_token = (self.n_tokens + i for i in range(3))
        self.register_buffer("offsets", torch.from_numpy(offsets[:-1]), persistent=False)
        self.level_offsets = tuple(int(o) for o in offsets[:-1])  # host ints: no device syncs
        self.register_buffer("item_tokens", trie.codes + self.offsets, persistent=False)
        d = cfg.d_model
        self.embed = nn.Embedding(self.n_tokens + 3, d, padding_idx=self.pad_token)
        per_item = depth if cfg.history_tokens == "levels" else 1
        self.enc_pos = nn.Embedding(cfg.max_history * per_item + 1, d)
        self.dec_pos = nn.Embedding(depth, d)
        head_dim = cfg.head_dim or d // cfg.n_heads
        sizes = (d, cfg.n_heads, head_dim, cfg.d_ff, cfg.dropout)
        self.encoder = nn.ModuleList(EncoderLayer(*sizes) for _ in range(cfg.n_layers))
        self.enc_norm = nn.LayerNorm(d)
        self.decoder = nn.ModuleList(DecoderLayer(*sizes) for _ in range(cfg.n_layers))
        self.dec_norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, self.n_tokens)

    @property
    def depth(self) -> int:
        """Tokens per item (SID levels + collision suffix)."""
        return self.trie.depth

    def encode(self, histories: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(memory (B, S, d), keep mask (B, S): True for real tokens) of item-row histories
        (B, H), -1 padded."""
        h = trim_padding(histories[:, -self.cfg.max_history:])
        b, n = h.shape
        tokens = torch.where((h >= 0)[..., None], self.item_tokens[h.clamp(min=0)], self.pad_token)
        end = torch.full((b, 1), self.end_token, device=h.device)
        if self.cfg.history_tokens == "levels":
            tokens = torch.cat([tokens.reshape(b, n * self.depth), end], dim=1)
            x = self.embed(tokens)
            keep = tokens != self.pad_token
        else:  # one token per item: the sum of its code tokens' embeddings (pad rows: zeros)
            x = torch.cat([self.embed(tokens).sum(2), self.embed(end)], dim=1)
            keep = torch.cat([h >= 0, torch.ones_like(end, dtype=torch.bool)], dim=1)
        # positions count back from the end token, so the newest item always sits at the same place
        pos = torch.arange(x.shape[1] - 1, -1, -1, device=h.device)
        x = x + self.enc_pos(pos)[None]
        for layer in self.encoder:
            x = layer(x, keep)
        return self.enc_norm(x), keep

    def decode(self, memory: torch.Tensor, memory_keep: torch.Tensor, prefix: torch.Tensor
               ) -> torch.Tensor:
        """Hidden states (B, W, t+1, d) after BOS + `prefix` tokens (B, W, t) (global token ids)."""
        b, w, t = prefix.shape
        tokens = torch.cat([torch.full((b, w, 1), self.bos_token, device=prefix.device), prefix], 2)
        x = self.embed(tokens) + self.dec_pos.weight[: t + 1]
        for layer in self.decoder:
            x = layer(x, memory, memory_keep)
        return self.dec_norm(x)

    def decoder_start(self, memory: torch.Tensor, memory_keep: torch.Tensor) -> DecoderState:
        """The incremental decoder after BOS (one sequence per request): its `hidden` gives
        the first level's distribution."""
        b = memory.shape[0]
        cross = tuple(layer.memory_kv(memory) for layer in self.decoder)
        x = (self.embed.weight[self.bos_token] + self.dec_pos.weight[0]).expand(b, 1, -1)
        return self._run_step(x, None, None, cross, memory_keep)

    def decoder_step(self, state: DecoderState, tokens: torch.Tensor,
                     parent: torch.Tensor | None = None) -> DecoderState:
        """Extend sequences by one token: tokens (B, W') global token ids, sequence w' of the
        new state = sequence `parent[:, w']` (B, W') of `state` followed by `tokens[:, w']`
        (parent None: sequence w' itself; a state of one sequence per request: that one)."""
        b, w = tokens.shape
        t = state.keys[0].shape[2]  # positions so far: the new one is at position t
        x = self.embed(tokens) + self.dec_pos.weight[t]
        if state.keys[0].shape[1] == 1:  # one parent per request: broadcast, no copies
            past = [(k.expand(-1, w, -1, -1, -1), v.expand(-1, w, -1, -1, -1))
                    for k, v in zip(state.keys, state.values)]
        elif parent is None:
            past = list(zip(state.keys, state.values))
        else:
            idx = torch.arange(b, device=tokens.device)[:, None]
            past = [(k[idx, parent], v[idx, parent]) for k, v in zip(state.keys, state.values)]
        return self._run_step(x, [p[0] for p in past], [p[1] for p in past], state.cross,
                              state.memory_keep)

    def _run_step(self, x: torch.Tensor, past_k, past_v, cross, memory_keep) -> DecoderState:
        keys, values = [], []
        for i, layer in enumerate(self.decoder):
            x, k, v = layer.step(x, None if past_k is None else past_k[i],
                                 None if past_v is None else past_v[i], cross[i], memory_keep)
            keys.append(k)
            values.append(v)
        return DecoderState(self.dec_norm(x), tuple(keys), tuple(values), cross, memory_keep)

    def level_log_probs(self, hidden: torch.Tensor, level: int) -> torch.Tensor:
        """Log-softmax over level `level`'s vocabulary: (..., vocab of that level), by code.

        Only that level's slice of the output layer is computed (the softmax the model was
        trained with, masked to the level, gives the same numbers at depth x the cost).
        """
        return torch.log_softmax(self._level_logits(hidden, level).float(), dim=-1)

    def _level_logits(self, hidden: torch.Tensor, level: int) -> torch.Tensor:
        lo = self.level_offsets[level]
        return F.linear(hidden, self.head.weight[lo:lo + self.trie.vocab[level]],
                        self.head.bias[lo:lo + self.trie.vocab[level]])

    def loss(self, histories: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean over requests of -log p(target code | history) (summed over levels)."""
        memory, keep = self.encode(histories)
        hidden = self.decode(memory, keep, self.item_tokens[targets][:, None, :-1])[:, 0]  # (B, D, d)
        codes = self.trie.codes[targets]  # (B, D), by level
        # level by level over that level's slice of the output layer: the same softmax as the
        # full vocabulary masked to the level (the masked logits add exp(-inf) = 0), at 1/depth
        # of the output layer's work and without the (B, D, n_tokens) logits
        total = sum(F.cross_entropy(self._level_logits(hidden[:, d], d).float(), codes[:, d],
                                    reduction="sum") for d in range(self.depth))
        return total / len(targets)

    @torch.inference_mode()
    def score_items(self, histories: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """log p(item) by teacher forcing for candidate item rows (B, n): the brute-force reference."""
        return self.level_scores(histories, rows).sum(-1)

    @torch.inference_mode()
    def level_scores(self, histories: torch.Tensor, rows: torch.Tensor,
                     encoded: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Per-level log p(code_d | code_<d, history) of candidate item rows (B, n) -> (B, n, D).

        `encoded`: the histories' `encode` output, when the caller already has it.
        """
        memory, keep = encoded if encoded is not None else self.encode(histories)
        hidden = self.decode(memory, keep, self.item_tokens[rows][..., :-1])  # (B, n, D, d)
        codes = self.trie.codes[rows]  # (B, n, D)
        return torch.stack([self.level_log_probs(hidden[..., d, :], d)
                            .gather(-1, codes[..., d, None])[..., 0]
                            for d in range(self.depth)], dim=-1)

    @torch.inference_mode()
    def candidate_scores(self, start: DecoderState, rows: torch.Tensor) -> torch.Tensor:
        """`level_scores` of candidate rows (B, n) from the requests' `decoder_start` state,
        incrementally: the BOS position once per request, then depth - 1 positions per
        candidate (teacher forcing runs depth per candidate)."""
        tokens = self.item_tokens[rows]  # (B, n, D)
        codes = self.trie.codes[rows]
        state, levels = start, []
        for d in range(self.depth):
            if d:  # candidate j's prefix grows by its own next token
                state = self.decoder_step(state, tokens[..., d - 1])
            lp = self.level_log_probs(state.hidden, d)
            if lp.shape[1] == 1:
                lp = lp.expand(-1, rows.shape[1], -1)
            levels.append(lp.gather(-1, codes[..., d, None])[..., 0])
        return torch.stack(levels, dim=-1)

    @torch.inference_mode()
    def beam_search(self, histories: torch.Tensor, beam: int | None = None,
                    return_codes: bool = False,
                    encoded: tuple[torch.Tensor, torch.Tensor] | None = None,
                    start: DecoderState | None = None) -> tuple[torch.Tensor, ...]:
        """Top items by log p(code), constrained to the trie: (rows (B, beam), scores (B, beam)).

        Sorted best first; where fewer than `beam` items exist, the tail is row -1 with
        score -inf. `return_codes` adds the generated codes (B, beam, D) (-1 in the tail),
        which must be the returned rows' codes (what the tests check). `encoded`: the
        histories' `encode` output, when the caller already has it; `start`: their
        `decoder_start` state (shared with `candidate_scores`).
        """
        beam = beam or self.cfg.beam
        trie = self.trie
        if start is None:
            start = self.decoder_start(*(encoded if encoded is not None else self.encode(histories)))
        state = start
        b, dev = histories.shape[0], histories.device
        node = torch.zeros((b, 1), dtype=torch.int64, device=dev)
        score = torch.zeros((b, 1), device=dev)
        prefix = torch.zeros((b, 1, 0), dtype=torch.int64, device=dev)
        parent = None
        for d in range(trie.depth):
            w = node.shape[1]
            if d:  # the beams' new tokens, each after its parent's cached prefix
                state = self.decoder_step(state, prefix[:, :, -1], parent)
            lp = self.level_log_probs(state.hidden, d)  # (B, W, V_d)
            tok, nxt = trie.padded(d)
            child_tok, child_node = tok[node.clamp(min=0)], nxt[node.clamp(min=0)]  # (B, W, F)
            fan = child_tok.shape[2]
            cand = lp.gather(2, child_tok.clamp(min=0))
            cand = torch.where(child_tok >= 0, cand + score[..., None], -math.inf)
            score, idx = cand.reshape(b, w * fan).topk(min(beam, w * fan), dim=1)
            parent = idx // fan
            node = child_node.reshape(b, w * fan).gather(1, idx)
            new_tok = child_tok.reshape(b, w * fan).gather(1, idx) + self.offsets[d]
            prefix = torch.cat([prefix.gather(1, parent[..., None].expand(-1, -1, d)),
                                new_tok[..., None]], dim=2)
        found = torch.isfinite(score)
        rows = torch.where(found, node, PAD)
        codes = torch.where(found[..., None], prefix - self.offsets, PAD)
        if rows.shape[1] < beam:
            fill = beam - rows.shape[1]
            rows = torch.cat([rows, torch.full((b, fill), PAD, device=dev)], 1)
            score = torch.cat([score, torch.full((b, fill), -math.inf, device=dev)], 1)
            codes = torch.cat([codes, torch.full((b, fill, trie.depth), PAD, device=dev)], 1)
        return (rows, score, codes) if return_codes else (rows, score)

    def to(self, *args, **kwargs):  # keep the trie's tensors with the model
        out = super().to(*args, **kwargs)
        device = next(self.parameters()).device
        self.trie = self.trie.to(device)
        return out



def trim_padding(histories: torch.Tensor) -> torch.Tensor:
    """Drop the leading columns that are padding in every row (at least one column stays)."""
    longest = int((histories >= 0).sum(dim=1).max()) if histories.numel() else 0
    return histories[:, histories.shape[1] - max(1, longest):]



def train_retriever(
    model: Retriever,
    histories: np.ndarray,
    targets: np.ndarray,
    *,
    seed: int = 0,
    valid: tuple[np.ndarray, np.ndarray] | None = None,
    progress=None,
) -> History:
    """Train on (history rows (N, H), target row (N,)) windows; returns the training `History`.

    AdamW with linear warm-up then cosine decay over `cfg.epochs`; batches in a seeded random
    order. With `cfg.patience` set and `valid` = (history rows, target rows) of validation
    requests, each epoch ends with the beam's HR@10 on them (`beam_hit_rate`) and training
    stops early, keeping the best epoch's weights (`quasid.stack.training.train_epochs`).
    `progress` is an optional callable(epoch, loss[, validation score]) for reporting.
    """
    cfg = model.cfg
    device = next(model.parameters()).device
    hist = torch.as_tensor(histories, dtype=torch.int64, device=device)
    tgt = torch.as_tensor(targets, dtype=torch.int64, device=device)
    n = len(tgt)
    steps_per_epoch = max(1, math.ceil(n / cfg.batch_size))
    total = steps_per_epoch * cfg.epochs
    opt = optimizer(model, cfg.lr, cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, cfg.warmup_steps, 0.1))
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout draws
    validate = None
    if cfg.patience is not None:
        if valid is None:
            raise ValueError("retriever.patience is set: expected validation requests to stop on")
        v_hist, v_tgt = sample_windows(*valid, cfg.valid_requests, seed)
        validate = lambda: beam_hit_rate(model, v_hist, v_tgt)  # noqa: E731
    return train_epochs(model, lambda idx, _: model.loss(hist[idx], tgt[idx]), histories,
                        cfg.batch_size, cfg.epochs, opt, sched, gen, grad_clip=cfg.grad_clip,
                        progress=progress, validate=validate, patience=cfg.patience)


@torch.inference_mode()
def beam_hit_rate(model: Retriever, histories: np.ndarray, targets: np.ndarray, k: int = 10,
                  batch_size: int = 1024) -> float:
    """HR@k of the constrained beam (beam = the model's `cfg.beam`, at least k) over requests
    given as (history rows (n, H), target rows (n,)): the early-stopping score."""
    device = next(model.parameters()).device
    if len(targets) == 0:
        return float("nan")
    hits = 0
    for s in range(0, len(targets), batch_size):
        hist = torch.as_tensor(histories[s:s + batch_size], dtype=torch.int64, device=device)
        tgt = torch.as_tensor(targets[s:s + batch_size], dtype=torch.int64, device=device)
        with autocast(device):
            rows, _ = model.beam_search(hist, max(k, model.cfg.beam))
        hits += int((rows[:, :k] == tgt[:, None]).any(dim=1).sum())
    return hits / len(targets)


@torch.inference_mode()
def beam_throughput(model: Retriever, histories: np.ndarray, *, beam: int = 20,
                    batch_size: int = 1024, repeats: int = 3) -> float:
    """Requests per second of `beam_search` over `histories` (best of `repeats` passes)."""
    device = next(model.parameters()).device
    hist = torch.as_tensor(histories, dtype=torch.int64, device=device)
    best = math.inf
    for _ in range(repeats + 1):  # the first pass warms up kernels and caches
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for s in range(0, len(hist), batch_size):
            with autocast(device):
                model.beam_search(hist[s:s + batch_size], beam)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return len(hist) / best
