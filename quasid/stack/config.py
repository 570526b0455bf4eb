"""What shapes a SID stack: the retriever's and the ranker's sizes and schedules, serving.

`stack_config(overrides)` is the default `StackConfig` with nested overrides merged in
(`quasid.core.config.merge`), e.g. `{"retriever": {"epochs": 5}, "candidates": 40}`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from quasid.core.config import CONFIGS_DIR, Config, ConfigError, load_yaml, merge, nested_update


class RetrieverConfig(Config):
    """Model size and training schedule.

    Defaults: TIGER's width (d_model 128) at half its depth and feed-forward size and a short
    schedule, chosen from validation learning curves on Beauty under the GPU budget of the
    offline benchmark (benchmarks/README.md).
    """

    d_model: int = 128
    n_heads: int = 4
    head_dim: int | None = None
    """Width of one attention head (None: d_model / n_heads); TIGER: 6 heads of 64 at d_model 128."""
    n_layers: int = 2
    """Encoder layers and decoder layers (each)."""
    history_tokens: Literal["levels", "item"] = "levels"
    """How the encoder reads the history: "levels", TIGER's, one token per SID level (and
    the collision rank) of each item; "item", one token per item, the sum of those tokens'
    embeddings (depth x fewer encoder positions and memory keys: the CPU main job's)."""
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
    patience: int | None = None
    """Early stopping: after each epoch the beam's HR@10 on validation requests (each user's
    second-to-last item, never the test item) is measured, the best epoch's weights are kept,
    and training stops after this many epochs without a gain (None: off, run all epochs)."""
    valid_requests: int | None = 4096
    """Validation requests scored per epoch when early stopping (a seeded sample; None: all)."""


class RankerConfig(Config):
    """Ranker size and training schedule."""

    d_model: int = 64
    n_heads: int = 2
    n_layers: int = 2
    dropout: float = 0.1
    max_history: int = 20
    negatives: int = 32
    shared_negatives: bool = False
    """False: `negatives` uniform warm items drawn per training window; True: drawn once per
    batch and shared by all its windows (each one's representation computed once: the CPU
    main job's, with more of them)."""
    id_dropout: float = 0.2
    epochs: int = 10
    batch_size: int = 1024
    lr: float = 3e-3
    weight_decay: float = 1e-4


class TransitionConfig(Config):
    """The stack's transition counts (`quasid.stack.transitions.FollowerTable`): followers
    of the newest history items as candidates and log p_T(item | history) as a score feature."""

    candidates: int = 30
    """Followers (by weighted count) joining the candidates after the beam and the cold
    quota, before the popularity fill (0: none)."""
    weight: float = 0.0
    """p(order) = sigmoid(ranker logit + retrieval_weight * log p + weight * log p_T)."""
    weight_grid: tuple[float, ...] = (0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
    """Weights tried with every `StackConfig.weight_grid` value on validation requests (a
    narrower 0 .. 4 grid put every Beauty and Toys run at its top, 4: benchmarks/README.md)."""
    successors: int = 50
    """Followers kept per item (the most frequent; rarer ones count as 0)."""
    backoff: int = 3
    """Newest history items whose followers count."""
    decay: float = 0.5
    """Weight of the l-th newest item's counts: decay ** l."""
    prior: float = 1.0
    """Pseudo-count of the popularity prior mixed into every request's counts."""


class StackConfig(Config):
    """Everything that shapes a stack; `overrides` dicts map onto these fields."""

    retriever: RetrieverConfig = RetrieverConfig()
    ranker: RankerConfig = RankerConfig()
    transitions: TransitionConfig = TransitionConfig()
    candidates: int = 100
    """Candidate set size handed to the ranker (beam, cold quota, followers, then popularity fill)."""
    price_alpha: float = 0.0
    """GMV-aware ranking: score = p(order) * price ** price_alpha."""
    retrieval_weight: float = 1.0
    """p(order) = sigmoid(ranker logit + retrieval_weight * retriever log p(item) + the
    transition term)."""
    weight_grid: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
    """Retrieval weights `Stack.fit_score_weights` tries on validation requests (each with
    every `transitions.weight_grid` value)."""
    exclude_history: bool = False
    """Drop items the user already has from the candidates."""
    cold_candidates: int = 50
    """Cold-start quota: up to this many items without training interactions join the
    candidates, those sharing their first `cold_prefix` SID levels with a beam result (0: off).
    The retriever never saw them as targets, so its log p of their full code says nothing;
    they are scored with the log p of that prefix spread evenly over the items under it,
    plus `cold_bias`."""
    cold_prefix: int = 1
    """SID levels a cold candidate shares with a beam result (1 .. SID levels)."""
    cold_slots: int = 2
    """Slate positions kept for the best-scoring cold candidates, when there are any (TIGER's
    epsilon share of the top-K; 0: cold items compete on score alone). The slate stays in
    score order. Defaults measured in benchmarks/README.md (cold HR@10 0 -> 0.0175 on Beauty)."""
    cold_in_beam: bool = True
    """The retrieval stage's top list merges the cold quota's items into the beam by their
    back-off log p (the beam search itself cannot reach codes the model never saw as
    targets); False: the beam search's results alone."""
    cold_bias: float = 0.0
    """Added to every cold candidate's back-off log p; fitted on validation requests from
    `cold_bias_grid` when the stack is trained with them."""
    cold_bias_grid: tuple[float, ...] = (-2.0, -1.0, 0.0, 1.0, 2.0, 4.0)
    """Biases `Stack.fit_cold_bias` tries (best NDCG@10 of the slates on validation)."""
    cold_bias_requests: int | None = 5000
    """Validation requests the cold bias is fitted on (a seeded sample; None: all): each grid
    point serves them again, the beam changing with the bias."""
    batch_size: int = 1024
    """Requests per device batch when serving."""
    max_train_windows: int | None = None
    """Train the retriever and the ranker on a seeded sample of at most this many (history,
    next item) windows (worlds of millions of users); None: all of them."""


def stack_config(overrides: Mapping[str, Any] | None = None) -> StackConfig:
    """`StackConfig` with `overrides` merged in; unknown keys raise `ConfigError` naming them."""
    return merge(StackConfig(), overrides, "overrides")


PRESETS_FILE = CONFIGS_DIR / "stacks.yaml"


def stack_preset(name: str, overrides: Mapping[str, Any] | None = None) -> dict:
    """The overrides of the named stack preset (`configs/stacks.yaml`) with `overrides` merged
    over them, checked: a plain dict for `stack_config`, so a run records what it set."""
    presets = load_yaml(PRESETS_FILE)
    if name not in presets:
        raise ConfigError(f"stack preset {name!r}: unknown (expected one of {sorted(presets)}, "
                          f"from {PRESETS_FILE})")
    combined = nested_update(presets[name] or {}, overrides or {})
    stack_config(combined)  # unknown keys or bad values fail here, naming them
    return combined
