"""Generative retrieval over SIDs (TIGER-style): a small encoder-decoder Transformer.

Input: the user's recent items (item rows, left-padded with -1, newest last), each spelled
as its full code (SID levels + collision rank, see `quasid.trie`), one token per level,
followed by an always-present end token (so an empty history still has something to
attend to). Output: the next item's code, one level at a time. Each level has its own
token range in one shared vocabulary (token = level offset + code), so the embedding and
output layers are shared while levels never mix.

Decoding is beam search constrained by the `SidTrie`: at each level a beam may only extend
its prefix with a token that leads to an existing item, so every result is a real item.
Beams of one request share the encoder memory: the decoder folds the beams into the
cross-attention's query axis instead of copying the memory once per beam.
The item score is log p(code) = the sum of the per-level log-probabilities (softmax over
the level's full vocabulary, as the model was trained; invalid tokens are then excluded).
`score_items` computes the same number by teacher forcing for any items, the brute-force
reference the beam search is tested against.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RetrieverConfig:
    """Model size and training schedule.

    Defaults: TIGER's width (d_model 128) at half its depth and feed-forward size and a short
    schedule, chosen from validation learning curves on Beauty under the GPU budget of the
    offline benchmark (benchmarks/README.md).
    """

    d_model: int = 128
    n_heads: int = 4
    n_layers: int = 2
    """Encoder layers and decoder layers (each)."""
    d_ff: int = 512
    dropout: float = 0.1
    max_history: int = 20
    epochs: int = 10
    batch_size: int = 1024
    lr: float = 3e-3
    weight_decay: float = 0.035
    warmup_steps: int = 200
    grad_clip: float = 1.0
    beam: int = 20
    """Beam width at serving time (and the number of items a beam search returns)."""


@dataclass(frozen=True)
class RankerConfig:
    """Ranker size and training schedule."""

    d_model: int = 64
    n_heads: int = 2
    n_layers: int = 2
    dropout: float = 0.1
    max_history: int = 20
    negatives: int = 32
    id_dropout: float = 0.2
    epochs: int = 10
    batch_size: int = 1024
    lr: float = 3e-3
    weight_decay: float = 1e-4


@dataclass(frozen=True)
class StackConfig:
    """Everything that shapes a stack; `overrides` dicts map onto these fields."""

    retriever: RetrieverConfig = field(default_factory=RetrieverConfig)
    ranker: RankerConfig = field(default_factory=RankerConfig)
    candidates: int = 100
    """Candidate set size handed to the ranker (beam, cold quota, then popularity fill)."""
    price_alpha: float = 0.0
    """GMV-aware ranking: score = p(order) * price ** price_alpha."""
    retrieval_weight: float = 1.0
    """p(order) = sigmoid(ranker logit + retrieval_weight * retriever log p(item))."""
    weight_grid: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
    """Weights `fit_retrieval_weight` tries on validation requests."""
    exclude_history: bool = False
    """Drop items the user already has from the candidates."""
    cold_candidates: int = 50
    """Cold-start quota: up to this many items without training interactions join the
    candidates, those sharing their first `cold_prefix` SID levels with a beam result (0: off).
    The retriever never saw them as targets, so its log p of their full code says nothing;
    they are scored with the log p of that prefix spread evenly over the items under it."""
    cold_prefix: int = 1
    """SID levels a cold candidate shares with a beam result (1 .. SID levels)."""
    cold_slots: int = 2
    """Slate positions kept for the best-scoring cold candidates, when there are any (TIGER's
    epsilon share of the top-K; 0: cold items compete on score alone). The slate stays in
    score order. Defaults measured in benchmarks/README.md (cold HR@10 0 -> 0.0175 on Beauty)."""
    batch_size: int = 1024
    """Requests per device batch when serving."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "weight_grid", tuple(float(w) for w in self.weight_grid))


def stack_config(overrides: dict | None = None) -> StackConfig:
    """`StackConfig` with `overrides` applied, e.g. `{"retriever": {"epochs": 5}, "candidates": 40}`.

    Unknown keys raise `ValueError` naming them and the known ones.
    """
    return _replace(StackConfig(), overrides or {}, "overrides")


def _replace(obj, changes: dict, where: str):
    known = {f.name: f for f in dataclasses.fields(obj)}
    kwargs = {}
    for key, value in changes.items():
        if key not in known:
            raise ValueError(f"{where}: unknown key '{key}' (expected one of {sorted(known)})")
        current = getattr(obj, key)
        kwargs[key] = (_replace(current, value, f"{where}.{key}")
                       if dataclasses.is_dataclass(current) and isinstance(value, dict) else value)
    return dataclasses.replace(obj, **kwargs)


def config_from_dict(data: dict) -> StackConfig:
    """Inverse of `dataclasses.asdict` for `StackConfig`."""
    data = dict(data)
    retriever = RetrieverConfig(**data.pop("retriever"))
    ranker = RankerConfig(**data.pop("ranker"))
    return StackConfig(retriever=retriever, ranker=ranker, **data)
