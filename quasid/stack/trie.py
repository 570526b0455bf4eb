"""Prefix trie over a SID table, as tensors, for constrained (valid-SID-only) decoding.

An item's full code is its SID (L levels) followed by its collision rank, so every item
has a distinct code of depth D = L + 1 (TIGER's extra disambiguation token). Items are
addressed by *row*: row r is the r-th item of the table sorted by `item_id`.

Nodes at depth d are the distinct code prefixes of length d, numbered in lexicographic
order (depth 0: the root, node 0). The edges leaving depth d are stored as CSR:
`indptr[d]` (n_nodes_d + 1), `token[d]` and `child[d]` (one entry per edge, sorted by
parent then token). The child of an edge at depth d is a node at depth d + 1, and at the
last depth it is the item row. `padded(d)` gives the same edges as dense
(n_nodes_d, max fan-out) matrices padded with -1, the form batched beam search gathers from.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import polars as pl
import torch

from quasid.core.schemas import SID_TABLE, ContractError, validate

PAD = -1
"""Padding in the dense child matrices (no edge)."""


def full_codes(sid_table: pl.DataFrame, source: str = "<sid table>") -> tuple[np.ndarray, np.ndarray]:
    """(item_ids sorted, codes (n_items, L + 1) int64) from a SID table: SID levels + collision rank.

    Raises `ContractError` (naming `source`) if the table breaks its schema, if two items
    share a full code, or if a code is negative.
    """
    validate(sid_table, SID_TABLE, source=source)
    if sid_table.height == 0:
        raise ContractError(f"{source}: the sid table is empty (expected at least one item)")
    table = sid_table.sort("item_id")
    n_levels = int(table["sid"].list.len()[0])
    sid = table["sid"].list.to_array(n_levels).to_numpy().astype(np.int64)
    codes = np.concatenate([sid, table["collision_rank"].to_numpy().astype(np.int64)[:, None]],
                           axis=1)
    if (codes < 0).any():
        rows = np.flatnonzero((codes < 0).any(axis=1))[:5]
        raise ContractError(f"{source}: column 'sid': negative codes at item_id "
                            f"{table['item_id'].to_numpy()[rows].tolist()} (expected codes >= 0)")
    _, first, counts = np.unique(codes, axis=0, return_index=True, return_counts=True)
    if (counts > 1).any():
        dup = codes[first[counts > 1][0]]
        ids = table["item_id"].to_numpy()[(codes == dup).all(axis=1)]
        raise ContractError(
            f"{source}: columns 'sid'+'collision_rank': items {ids[:5].tolist()} share the full "
            f"code {dup.tolist()} (expected collision_rank to tell items with one SID apart)")
    return table["item_id"].to_numpy().astype(np.int64), codes


@dataclass
class SidTrie:
    """The prefix trie of a set of full codes, in CSR form per depth (see module doc)."""

    codes: torch.Tensor
    """(n_items, D) int64: the full code of each item row."""
    vocab: tuple[int, ...]
    """Token vocabulary size per depth (max code + 1)."""
    indptr: list[torch.Tensor]
    token: list[torch.Tensor]
    child: list[torch.Tensor]
    node_of: list[torch.Tensor]
    """node_of[d]: (n_items,) the node id of each item's length-d prefix (d = 0..D-1)."""
    _padded: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_codes(cls, codes: np.ndarray, vocab: tuple[int, ...] | None = None) -> SidTrie:
        """Build the trie of `codes` (n_items, D), distinct rows of non-negative ints.

        `vocab` (per depth) defaults to max code + 1; a larger vocab is allowed (a
        tokenizer's codebook size), a smaller one is an error.
        """
        codes = np.asarray(codes, dtype=np.int64)
        if codes.ndim != 2 or codes.shape[0] == 0 or codes.shape[1] == 0:
            raise ValueError(f"codes: expected a non-empty (n_items, depth) matrix, got {codes.shape}")
        if (codes < 0).any():
            raise ValueError("codes: expected non-negative codes")
        n, depth = codes.shape
        seen = tuple(int(v) for v in codes.max(axis=0) + 1)
        vocab = seen if vocab is None else tuple(int(v) for v in vocab)
        if len(vocab) != depth or any(v < s for v, s in zip(vocab, seen)):
            raise ValueError(f"vocab {vocab}: expected {depth} sizes >= the codes' {seen}")
        indptr, token, child, node_of = [], [], [], []
        prefix = np.zeros(n, dtype=np.int64)  # node id of each item's prefix at depth d
        n_nodes = 1
        for d in range(depth):
            node_of.append(prefix)
            key = prefix * vocab[d] + codes[:, d]  # < n_items * vocab: fits in int64
            edges, first, inverse = np.unique(key, return_index=True, return_inverse=True)
            parent = prefix[first]
            if d == depth - 1:
                if len(edges) != n:
                    raise ValueError("codes: expected distinct rows (full codes must be unique)")
                nxt = first  # the item row whose code ends with this edge
            else:
                nxt = np.arange(len(edges), dtype=np.int64)
            indptr.append(np.concatenate([[0], np.cumsum(np.bincount(parent, minlength=n_nodes))]))
            token.append(codes[first, d])
            child.append(nxt)
            prefix, n_nodes = inverse.reshape(-1).astype(np.int64), len(edges)
        as_t = lambda arrays: [torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))
                               for a in arrays]
        return cls(torch.from_numpy(codes.copy()), vocab, as_t(indptr), as_t(token), as_t(child),
                   as_t(node_of))

    @property
    def depth(self) -> int:
        """Code length D (SID levels + the collision suffix)."""
        return len(self.vocab)

    @property
    def n_items(self) -> int:
        """Number of items (leaves)."""
        return int(self.codes.shape[0])

    def n_nodes(self, d: int) -> int:
        """Number of distinct prefixes of length `d`."""
        return int(self.indptr[d].numel() - 1)

    def to(self, device: str | torch.device) -> SidTrie:
        """A copy with every tensor on `device`."""
        move = lambda ts: [t.to(device) for t in ts]
        return SidTrie(self.codes.to(device), self.vocab, move(self.indptr), move(self.token),
                       move(self.child), move(self.node_of))

    def padded(self, d: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Edges leaving depth `d` as dense (n_nodes_d, max fan-out) (tokens, children), -1 padded."""
        if d not in self._padded:
            indptr, token, child = self.indptr[d], self.token[d], self.child[d]
            fanout = indptr[1:] - indptr[:-1]
            width = int(fanout.max())
            parent = torch.repeat_interleave(torch.arange(len(fanout), device=indptr.device), fanout)
            slot = torch.arange(len(token), device=indptr.device) - indptr[parent]
            tok = torch.full((len(fanout), width), PAD, dtype=torch.int64, device=indptr.device)
            nxt = torch.full_like(tok, PAD)
            tok[parent, slot] = token
            nxt[parent, slot] = child
            self._padded[d] = (tok, nxt)
        return self._padded[d]

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Item row of each full code in `codes` (..., D), or -1 where no item has that code."""
        flat = codes.reshape(-1, self.depth).to(self.codes.device)
        node = torch.zeros(len(flat), dtype=torch.int64, device=flat.device)
        alive = torch.ones(len(flat), dtype=torch.bool, device=flat.device)
        for d in range(self.depth):
            tok, nxt = self.padded(d)
            hit = tok[node.clamp(min=0)] == flat[:, d : d + 1]
            alive &= hit.any(dim=1)
            node = torch.where(alive, nxt[node.clamp(min=0), hit.int().argmax(dim=1)], PAD)
        return node.reshape(codes.shape[:-1])

    def state_dict(self) -> dict:
        """The tensors to save (the trie rebuilds from `codes` and `vocab`)."""
        return {"codes": self.codes.cpu(), "vocab": torch.tensor(self.vocab)}

    @classmethod
    def from_state_dict(cls, state: dict) -> SidTrie:
        """Inverse of `state_dict`."""
        return cls.from_codes(state["codes"].numpy(), tuple(state["vocab"].tolist()))
