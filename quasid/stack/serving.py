"""The SID stack an arm serves: generative retrieval (+ popularity fill) -> SID ranker -> top-K.

Built from one tokenizer's SID table. Per batch of requests:
1. the retriever's constrained beam search proposes `beam` items (cold items included:
   their SIDs come from content);
2. cold-start quota: items without training interactions that share their first SID
   level(s) with a beam result join (at most `cold_candidates`). The retriever, trained on
   warm targets only, gives their unseen full codes almost no probability, so they are
   scored by back-off: the log p of that prefix spread evenly over the items under it, plus
   `cold_bias` (fitted on validation requests). The retrieval stage's own top list (the
   "beam" `slates` returns) is the best `beam` of the beam results and these cold items by
   that log p, so the retriever alone reaches cold items too (`cold_in_beam`);
3. the items that most often followed the newest history items in the training logs join
   (at most `transitions.candidates`, by weighted count; `quasid.stack.transitions`);
4. the most popular training items not already proposed fill the candidate set up to
   `candidates` (the fallback when the beam is short, e.g. a tiny catalog);
5. every candidate is scored, p(order) * price ** price_alpha with p(order) =
   sigmoid(ranker logit + retrieval_weight * retriever log p + transitions.weight * log p_T),
   p_T the smoothed transition probability given the history, and the best `k` form the slate.
Everything is batched tensors on one device; item ids are mapped to rows (positions in the
SID table sorted by item id) on the way in and back on the way out.

`build_stack` trains a stack from a dataset folder and a SID table and saves it;
`Stack.load` reads it back. Training data: the interactions before `ds.cutoff_ts` when the
dataset has a cutoff, else the leave-one-out training part (cold items dropped), and then
the weights of the retriever's log p and of log p_T in the final score are fitted on the
validation items.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from quasid.core.config import merge
from quasid.core.io import write_atomic
from quasid.core.layout import STACK_FILE
from quasid.core.recommender import PAD
from quasid.data.sequences import row_mapper
from quasid.stack.config import (
    StackConfig,
)
from quasid.stack.ranker import Ranker, log_gmv_score
from quasid.stack.retriever import DecoderState, Retriever
from quasid.stack.training import autocast
from quasid.stack.transitions import FollowerTable
from quasid.stack.trie import SidTrie


class Stack:
    """A trained SID stack; implements `quasid.core.recommender.Recommender`."""

    def __init__(self, item_ids: np.ndarray, retriever: Retriever, ranker: Ranker,
                 popularity: np.ndarray, price: np.ndarray, cfg: StackConfig,
                 tokenizer: str = "sid", device: str = "cpu",
                 transitions: FollowerTable | None = None):
        """item_ids: (n_items,) sorted ids (= rows); popularity: training counts; price per
        row; transitions: the training logs' follower counts over rows (None: no transition
        candidates or feature, as in stacks saved before they existed)."""
        self.name = f"sid-stack:{tokenizer}"
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.device = torch.device(device)
        self.item_ids = np.array(item_ids, dtype=np.int64)
        self.popularity = np.array(popularity, dtype=np.int64)
        self.price = np.array(price, dtype=np.float64)
        self.retriever = retriever.to(self.device).eval()
        self.ranker = ranker.to(self.device).eval()
        self.transitions = None if transitions is None else transitions.to(self.device)
        self._price = torch.as_tensor(self.price, dtype=torch.float32, device=self.device)
        self._ids = torch.as_tensor(self.item_ids, device=self.device)
        self._rows_of = row_mapper(self.item_ids, "histories")
        self._derive()

    def set_config(self, **changes) -> None:
        """Change serving settings (e.g. `cold_candidates=0`, `retrieval_weight=2.0`) in place."""
        self.cfg = merge(self.cfg, changes, "set_config")
        self._derive()

    def _derive(self) -> None:
        """Tables that follow from the config: the popularity fill and the cold-start quota."""
        cfg = self.cfg
        # most popular warm items, enough to fill any candidate set after duplicates
        order = np.argsort(-self.popularity, kind="stable")
        order = order[self.popularity[order] > 0]
        fill = (cfg.candidates + cfg.retriever.beam + cfg.transitions.candidates
                + cfg.retriever.max_history)
        self._popular = torch.as_tensor(order[:fill], device=self.device)
        # per prefix node at depth `cold_prefix`: its cold items (padded table) and its size
        trie, cap, depth = self.retriever.trie, self.cfg.cold_candidates, self.cfg.cold_prefix
        if not 1 <= depth < trie.depth:
            raise ValueError(f"cold_prefix={depth}: expected 1 .. {trie.depth - 1} (the SID levels)")
        node = trie.node_of[depth].to(self.device)
        self._node = node
        self._region_log_size = torch.bincount(node).float().log()[node]
        cold = torch.nonzero(~self.ranker.warm).squeeze(1)
        cold = cold[torch.argsort(node[cold], stable=True)]
        counts = torch.bincount(node[cold], minlength=trie.n_nodes(depth))
        slot = torch.arange(len(cold), device=self.device) - (counts.cumsum(0) - counts)[node[cold]]
        keep = slot < cap
        self._cold_table = torch.full((trie.n_nodes(depth), max(cap, 1)), PAD, device=self.device)
        self._cold_table[node[cold][keep], slot[keep]] = cold[keep]

    @property
    def n_items(self) -> int:
        """Catalog size."""
        return len(self.item_ids)

    def rows_of(self, item_ids: np.ndarray) -> np.ndarray:
        """Rows of item ids (PAD stays PAD); unknown ids raise `ContractError` (a ValueError)."""
        return self._rows_of(item_ids)

    def recommend(self, histories: np.ndarray, k: int, users: np.ndarray | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
        """Slates (item ids (n, k), scores (n, k) float32) for left-padded id histories (n, H)."""
        items, scores, _ = self.slates(histories, k)
        return items, scores

    def slates(self, histories: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(slate ids (n, k), slate scores (n, k) float32, the beam's ids (n, beam)) in one pass."""
        if k > self.cfg.candidates:
            raise ValueError(f"k={k}: expected k <= candidates ({self.cfg.candidates})")
        if k > self.n_items:
            raise ValueError(f"k={k}: expected k <= the catalog size ({self.n_items})")
        items, scores, beams = [], [], []
        weights = (self.cfg.retrieval_weight, self.cfg.transitions.weight)
        for hist in self._batches(histories):
            beam, cand, logit, log_p, log_t = self._score_parts(hist)
            slate, top = self._select(cand, self._combine(cand, logit, log_p, log_t, weights), k)
            items.append(slate)
            scores.append(top.exp())  # p(order) * price ** alpha
            beams.append(beam)
        if not items:
            empty = np.zeros((0, k), dtype=np.int64)
            return empty, empty.astype(np.float32), np.zeros((0, self.cfg.retriever.beam), np.int64)
        return (self._to_ids(items), torch.cat(scores).float().cpu().numpy().astype(np.float32),
                self._to_ids(beams))

    @torch.inference_mode()
    def _score_parts(self, hist: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(beam rows, candidate rows, ranker logits, retriever log p, transition log p_T)
        for a batch of row histories (log p_T all 0 without a follower table)."""
        followers = None if self.transitions is None else self.transitions.request(hist)
        with autocast(self.device):
            # the decoder after BOS, shared by the beam and the candidates' scores
            start = self.retriever.decoder_start(*self.retriever.encode(hist))
            beam, beam_score = self.retriever.beam_search(hist, self.cfg.retriever.beam,
                                                          start=start)
            cand = self._candidates(hist, beam, followers)
            logit = self.ranker.logits(hist, cand)
            log_p, prefix = self._retriever_log_p(cand, beam, beam_score, start)
        if self.cfg.cold_candidates > 0:  # cold items: the prefix's log p, spread over its items
            rows = cand.clamp(min=0)
            region = prefix - self._region_log_size[rows] + self.cfg.cold_bias
            log_p = torch.where(self.ranker.warm[rows], log_p, region)
            if self.cfg.cold_in_beam:
                beam = self._merged_beam(beam, cand, log_p)
        log_t = torch.zeros_like(log_p) if followers is None else followers.log_p(cand)
        return beam, cand, logit.float(), log_p, log_t

    def _retriever_log_p(self, cand: torch.Tensor, beam: torch.Tensor, beam_score: torch.Tensor,
                         start: DecoderState) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(log p(full code) (B, N), log p of the first `cold_prefix` levels (B, N), or None
        without the cold quota) of candidate rows, teacher-forced only where needed.

        A beam result's log p is its beam score (the same per-level sums the beam search
        computed); with `cold_prefix` 1 a cold candidate needs only the first level's
        distribution, which depends on the history alone (one decoder position per
        request, `start`'s). Only the rest (the popularity fill, deeper cold prefixes) go
        through the decoder, compacted to the widest row's count, incrementally from `start`
        (`Retriever.candidate_scores`): the beam and the cold quota are most of the
        candidates, and the decoder over every candidate's code was most of serving.
        """
        retriever = self.retriever
        valid = cand >= 0
        rows = cand.clamp(min=0)
        warm = self.ranker.warm[rows]
        match = (cand[:, :, None] == beam[:, None, :]) & valid[:, :, None]
        in_beam = match.any(-1)
        log_p = torch.where(match, beam_score[:, None, :].float(), -math.inf).amax(-1)
        quota = self.cfg.cold_candidates > 0
        shallow = quota and self.cfg.cold_prefix == 1
        if not quota:  # every candidate's full code counts
            need = valid & ~in_beam
        elif shallow:
            need = valid & ~in_beam & warm
        else:  # cold candidates (in the beam too) need their deeper prefix
            need = valid & ((~in_beam & warm) | ~warm)
        prefix = None
        if shallow:
            first = retriever.level_log_probs(start.hidden[:, 0], 0)
            prefix = first.gather(1, retriever.trie.codes[rows][..., 0])
        width = int(need.sum(1).max()) if need.numel() else 0
        if width:
            order = torch.argsort((~need).to(torch.int8), dim=1, stable=True)[:, :width]
            taken = need.gather(1, order)
            levels = retriever.candidate_scores(start, torch.where(taken, cand.gather(1, order),
                                                                   0)).float()
            log_p = log_p.scatter(1, order, torch.where(taken, levels.sum(-1),
                                                        log_p.gather(1, order)))
            if quota and not shallow:
                prefix = torch.zeros_like(log_p).scatter(
                    1, order, levels[..., : self.cfg.cold_prefix].sum(-1))
        return log_p, prefix

    def _merged_beam(self, beam: torch.Tensor, cand: torch.Tensor, log_p: torch.Tensor
                     ) -> torch.Tensor:
        """The retrieval stage's top list, as wide as `beam`: the beam's results and the cold
        quota's items by retriever log p (back-off for cold ones); -1 where short. The
        popularity fill stays out (the retriever did not find it)."""
        found = (cand[:, :, None] == beam[:, None, :]).any(-1) | ~self.ranker.warm[cand.clamp(min=0)]
        score = torch.where((cand >= 0) & found, log_p, -math.inf)
        top, idx = score.topk(min(beam.shape[1], score.shape[1]), dim=1)
        return torch.where(torch.isfinite(top), cand.gather(1, idx), PAD)

    def _combine(self, cand: torch.Tensor, logit: torch.Tensor, log_p: torch.Tensor,
                 log_t: torch.Tensor, weights: tuple[float, float]) -> torch.Tensor:
        """log of the final score p(order) * price ** alpha (-inf at -1 candidates);
        weights = (retrieval weight, transition weight)."""
        retrieval, transition = weights
        blended = logit + retrieval * log_p
        if transition:
            blended = blended + transition * log_t
        score = log_gmv_score(blended, self._price[cand.clamp(min=0)], self.cfg.price_alpha)
        return torch.where(cand >= 0, score, -math.inf)

    def _select(self, cand: torch.Tensor, score: torch.Tensor, k: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """The slate (rows (B, k), scores) from scored candidates, honouring `cold_slots`."""
        chosen = score
        if self.cfg.cold_slots > 0:
            cold = ~self.ranker.warm[cand.clamp(min=0)] & (cand >= 0)
            best, where = torch.where(cold, score, -math.inf).topk(
                min(self.cfg.cold_slots, score.shape[1]), dim=1)
            reserved = torch.zeros_like(cold).scatter_(1, where, torch.isfinite(best))
            chosen = torch.where(reserved, math.inf, score)
        idx = chosen.topk(k, dim=1).indices
        top = score.gather(1, idx)
        order = top.argsort(dim=1, descending=True, stable=True)
        return cand.gather(1, idx.gather(1, order)), top.gather(1, order)

    def fit_score_weights(self, histories: np.ndarray, targets: np.ndarray, k: int = 10
                          ) -> dict[tuple[float, float], float]:
        """Set `retrieval_weight` and `transitions.weight` to the pair of grid values
        (`weight_grid` x `transitions.weight_grid`; the latter (0,) without a follower
        table) with the best NDCG@k on (history, target) requests.

        Meant for validation requests (never the test set). Returns {(retrieval weight,
        transition weight): NDCG@k}; ties go to the earlier pair (retrieval-major order).
        """
        from quasid.stack.metrics import hit_ndcg

        parts = [self._score_parts(h) for h in self._batches(histories)]
        transition_grid = (0.0,) if self.transitions is None else self.cfg.transitions.weight_grid
        pairs = [(w, t) for w in self.cfg.weight_grid for t in transition_grid]
        found = {}
        for pair in pairs:
            slates = torch.cat([self._select(c, self._combine(c, lg, lp, lt, pair), k)[0]
                                for _, c, lg, lp, lt in parts])
            ids = torch.where(slates >= 0, self._ids[slates.clamp(min=0)], PAD).cpu().numpy()
            found[pair] = float(hit_ndcg(ids, np.asarray(targets), ks=(k,))[f"ndcg@{k}"].mean())
        best = max(pairs, key=lambda pair: found[pair])  # max keeps the first of ties
        self.set_config(retrieval_weight=best[0], transitions={"weight": best[1]})
        return found

    def fit_cold_bias(self, histories: np.ndarray, targets: np.ndarray, k: int = 10
                      ) -> dict[float, dict[str, float]]:
        """Set `cold_bias` to the grid value with the best NDCG@k of the slates on
        (history, target) requests (validation, never test); returns {bias: {ndcg, cold
        hr@k of the slates, of the beam}}. Ties go to the value nearest 0 (the back-off
        unshifted); nothing changes when the cold quota is off."""
        from quasid.stack.metrics import hit_ndcg

        if self.cfg.cold_candidates <= 0:
            return {}
        targets = np.asarray(targets)
        cold = ~self.ranker.warm.cpu().numpy()[self.rows_of(targets)]
        found = {}
        for bias in self.cfg.cold_bias_grid:
            self.set_config(cold_bias=bias)
            slate, _, beam = self.slates(histories, k)
            stack, alone = hit_ndcg(slate, targets, ks=(k,)), hit_ndcg(beam[:, :k], targets, ks=(k,))
            cold_hr = {name: float(per[f"hr@{k}"][cold].mean()) if cold.any() else math.nan
                       for name, per in ((f"cold_hr@{k}", stack), (f"beam_cold_hr@{k}", alone))}
            found[bias] = {f"ndcg@{k}": float(stack[f"ndcg@{k}"].mean()), **cold_hr}
        best = max(self.cfg.cold_bias_grid, key=lambda b: (found[b][f"ndcg@{k}"], -abs(b)))
        self.set_config(cold_bias=best)
        return found

    def _to_ids(self, rows: list[torch.Tensor]) -> np.ndarray:
        r = torch.cat(rows)
        return torch.where(r >= 0, self._ids[r.clamp(min=0)], PAD).cpu().numpy().astype(np.int64)

    def _batches(self, histories: np.ndarray):
        histories = np.asarray(histories, dtype=np.int64)
        if histories.ndim != 2:
            raise ValueError(f"histories: expected an (n, H) matrix, got shape {histories.shape}")
        rows = self.rows_of(histories)
        for s in range(0, len(rows), self.cfg.batch_size):
            yield torch.as_tensor(rows[s:s + self.cfg.batch_size], device=self.device)

    def _candidates(self, hist: torch.Tensor, beam: torch.Tensor, followers=None) -> torch.Tensor:
        """Candidate rows (B, candidates): the beam, then cold items under the beam's SID
        prefixes (at most `cold_candidates`), then the history's best followers (at most
        `transitions.candidates`, from `followers` = `FollowerTable.request`), then popular
        items; no repeats, -1 if short."""
        b, width = beam.shape
        cap = self.cfg.cold_candidates
        parts = [beam]
        if cap > 0:
            cold = self._cold_table[self._node[beam.clamp(min=0)]]  # (B, W, cap)
            parts.append(torch.where((beam >= 0)[..., None], cold, PAD).reshape(b, -1))
        if followers is not None and self.cfg.transitions.candidates > 0:
            parts.append(followers.top(self.cfg.transitions.candidates))
        parts.append(self._popular.expand(b, -1))
        pool = torch.cat(parts, dim=1)
        bad = (pool < 0) | _repeats(pool)
        if self.cfg.exclude_history:
            bad |= (pool[:, :, None] == hist[:, None, :]).any(-1)
        if cap > 0:
            in_cold = torch.zeros(pool.shape[1], dtype=torch.bool, device=pool.device)
            in_cold[width: width + parts[1].shape[1]] = True
            cold_ok = in_cold & ~bad
            bad |= cold_ok & (cold_ok.cumsum(dim=1) > cap)
        n = min(self.cfg.candidates, self.n_items)
        position = torch.arange(pool.shape[1], device=pool.device).expand_as(pool)
        keep = torch.where(bad, pool.shape[1], position).argsort(dim=1, stable=True)[:, :n]
        return torch.where(bad.gather(1, keep), PAD, pool.gather(1, keep))

    def save(self, path: str | Path) -> Path:
        """Write the stack to one file (config, item table, both models), atomically."""
        path = Path(path)
        state = {
            "format": 1,
            "tokenizer": self.tokenizer,
            "config": json.dumps(self.cfg.model_dump()),
            "item_ids": torch.as_tensor(self.item_ids),
            "popularity": torch.as_tensor(self.popularity),
            "price": torch.as_tensor(self.price),
            "trie": self.retriever.trie.state_dict(),
            "warm": self.ranker.warm.cpu(),
            "sid": self.ranker.sid.cpu(),
            "retriever": {k: v.cpu() for k, v in self.retriever.state_dict().items()},
            "ranker": {k: v.cpu() for k, v in self.ranker.state_dict().items()},
        }
        if self.transitions is not None:
            state["transitions"] = self.transitions.state_dict()
        return write_atomic(path, lambda fh: torch.save(state, fh))

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> Stack:
        """Read a stack written by `save` (or the `stack.pt` inside a `build_stack` folder)."""
        path = Path(path)
        if path.is_dir():
            path = path / STACK_FILE
        if not path.exists():
            raise FileNotFoundError(f"{path}: no saved stack (expected a file written by Stack.save)")
        state = torch.load(path, map_location="cpu", weights_only=True)
        cfg = StackConfig.model_validate_json(state["config"])
        trie = SidTrie.from_state_dict(state["trie"])
        retriever = Retriever(trie, cfg.retriever)
        retriever.load_state_dict(state["retriever"])
        ranker = Ranker(state["sid"].numpy(), state["warm"].numpy(), cfg.ranker)
        ranker.load_state_dict(state["ranker"])
        transitions = state.get("transitions")
        return cls(state["item_ids"].numpy(), retriever, ranker, state["popularity"].numpy(),
                   state["price"].numpy(), cfg, state["tokenizer"], device,
                   None if transitions is None else FollowerTable.from_state_dict(transitions))


def _repeats(pool: torch.Tensor) -> torch.Tensor:
    """True where a row's value already occurred earlier in that row (sort-based, O(P log P))."""
    values, order = pool.sort(dim=1, stable=True)
    later = torch.zeros_like(pool, dtype=torch.bool)
    later[:, 1:] = values[:, 1:] == values[:, :-1]
    return torch.zeros_like(later).scatter_(1, order, later)
