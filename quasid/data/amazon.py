"""Import a dataset in the S3-Rec packaging (e.g. the Amazon 5-core benchmarks) as a folder.

Source files: `<name>.txt`, one user per line (`user_id item_id item_id ...`, time order,
ids from 1), `<name>_item2attributes.json` (`{"item_id": [attribute_id, ...]}`: brand and
category-path ids) and, for the `text` content, `<name>_item_text.tsv` (`item_id, asin,
text`). Any dataset name whose files are there is accepted.

What the import keeps and what it makes:
- real: users, items, each user's item order (`ts` = position in the line, `event` =
  "review"), the attribute sets;
- simulated (seeded): prices, a log-normal per attribute group, and a cold cohort of
  ~10% of items (no interactions in the training logs: later steps drop them from
  training through `leave_one_out(cold_items=...)`), joined by the few items whose every
  interaction is a validation or test target (they have no training interactions either);
- derived: the content embedding, the parts the recipe (`content`, e.g.
  `attributes+cooccurrence`, the default, or `text+attributes`) names, in the order text |
  attributes | cooccurrence, each L2-normalised and weighted 1/sqrt(parts), so the vector
  has unit norm and its cosine is the mean of the parts' cosines (none dominates); each part
  gets dim // parts dimensions, the last the remainder:
  * text part: the item text's sentence-encoder embedding (`quasid.data.text`, cached by the
    texts' hash), PCA (exact SVD of the centred matrix, signs fixed) to its dimensions;
  * attribute part: PPMI of the item x attribute matrix, truncated SVD (U sqrt(S));
  * collaborative part: PPMI (context smoothing 0.75) of item-item co-occurrence within
    `window` positions of each user's *training* sequence (leave-one-out train portion
    without the cold items), truncated SVD. Attributes alone cannot separate items (86%
    of Beauty's items share their exact attribute set with another), the co-occurrence
    does. Cold items, and warm items without training co-occurrence, get the mean
    collaborative part of their `neighbors` nearest donor items by the cosine of the other
    parts (attributes and/or text; ties at the k-th similarity all included, so the result
    does not depend on order).
The truncated SVD is a seeded randomized SVD (Halko, Martinsson & Tropp 2011), so the
same seed gives the same bytes.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import numpy as np
import polars as pl
import scipy.sparse as sp
from pydantic import (
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    field_validator,
)

from quasid.core.config import Config, merge
from quasid.core.hashing import file_digest
from quasid.core.schemas import ContractError
from quasid.data.dataset import counts, write_dataset
from quasid.data.splits import leave_one_out
from quasid.data.text import SentenceEncoder, TextEncoder, embed_texts, read_item_text

NAMES = ("Beauty", "Toys_and_Games")
"""The datasets the papers report on (any S3-Rec-packaged name imports)."""
CONTENT_PARTS = ("text", "attributes", "cooccurrence")
DEFAULT_CONTENT = "attributes+cooccurrence"
EVENT = "review"
ID_PATTERN = r"^[1-9][0-9]{0,17}$"
"""A source id: a positive integer that fits in int64."""
EXPECTED_LINE = "'user_id item_id item_id ...' (positive integer ids, separated by spaces)"
EXPECTED_JSON = '{"item_id": [attribute_id, ...]} (item ids as keys, lists of integers >= 0)'

_ATTRIBUTES = TypeAdapter(
    dict[Annotated[str, StringConstraints(pattern=ID_PATTERN)],
         list[Annotated[int, Field(strict=True, ge=0, le=2**62)]]]
)


class AmazonConfig(Config):
    """Settings of the import; the defaults are what `quasid data import-amazon` uses."""

    dim: int = 64
    """Content dimension: dim // 2 attribute dimensions, the rest collaborative."""
    window: int = 3
    """Co-occurrence window (positions either side) in the training sequences."""
    neighbors: int = 10
    """Donor items whose collaborative parts are averaged for cold items."""
    cold_share: float = 0.10
    """Share of items in the cold cohort."""
    price_median: float = 20.0
    """Median of the group medians (dollars)."""
    group_sigma: float = 0.5
    """Log-sd of the group medians around `price_median`."""
    item_sigma: float = 0.6
    """Log-sd of item prices around their group median."""
    context_power: float = 0.75
    """Context-distribution smoothing of the co-occurrence PPMI (Levy et al. 2015)."""
    svd_power_iters: int = 6
    svd_oversample: int = 16
    content: str = DEFAULT_CONTENT
    """The content recipe: `+`-joined parts among text, attributes, cooccurrence."""

    @field_validator("content")
    @classmethod
    def _recipe(cls, value: str) -> str:
        parts = content_parts(value)
        return "+".join(parts)

    @property
    def parts(self) -> tuple[str, ...]:
        """The recipe's parts, in layout order."""
        return content_parts(self.content)


def content_parts(recipe: str) -> tuple[str, ...]:
    """The parts of a content recipe in layout order; a clear error for a bad recipe."""
    names = [p.strip() for p in recipe.split("+")]
    unknown = [p for p in names if p not in CONTENT_PARTS]
    if unknown or not names or len(set(names)) != len(names):
        raise ValueError(f"content {recipe!r}: expected distinct parts joined by '+' among "
                         f"{', '.join(CONTENT_PARTS)} (e.g. text+attributes)")
    if names == ["cooccurrence"]:
        raise ValueError(f"content {recipe!r}: co-occurrence alone gives cold items no content "
                         f"(add text or attributes)")
    return tuple(p for p in CONTENT_PARTS if p in names)


# --------------------------------------------------------------------------- reading


def source_paths(name: str, src: str | Path) -> tuple[Path, Path]:
    """The sequence and attribute files of `name` under `src`; errors name what is wrong."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ContractError(f"--name {name!r}: expected a dataset name (letters, digits, "
                            f"'_', '.', '-'), the stem of <name>.txt")
    src = Path(src)
    paths = (src / f"{name}.txt", src / f"{name}_item2attributes.json")
    for path, what in zip(paths, ("sequence file", "attribute file")):
        if not path.is_file():
            raise ContractError(f"{path}: file not found (expected the S3-Rec {what} of "
                                f"{name}: {path.name}; known datasets: {', '.join(NAMES)})")
    return paths


def read_sequences(path: Path) -> pl.DataFrame:
    """Parse `<name>.txt` into interactions (user_id, item_id, ts = position, event).

    Raises `ContractError` naming the file, the line and what was expected for a line
    without items, a token that is not a positive integer id, or a repeated user.
    """
    lines = _read_text(path).split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline
    tokens = pl.DataFrame({"line": pl.int_range(1, len(lines) + 1, eager=True),
                           "tok": pl.Series(lines, dtype=pl.String).str.extract_all(r"\S+")})
    short = tokens.filter(pl.col("tok").list.len() < 2)
    if short.height:
        line, tok = short.row(0)
        raise ContractError(f"{path}: line {line}: expected {EXPECTED_LINE} with a user id and at "
                            f"least one item id; found {len(tok)} token(s) {_short(tok)}")
    flat = (tokens.with_columns(pos=pl.int_ranges(pl.col("tok").list.len()))
            .explode(["tok", "pos"]))
    bad = flat.filter(~pl.col("tok").str.contains(ID_PATTERN))
    if bad.height:
        line, tok, pos = bad.row(0)
        raise ContractError(f"{path}: line {line}, token {pos + 1}: {tok!r} is not a positive "
                            f"integer id; expected {EXPECTED_LINE} ({bad.height} bad token(s))")
    flat = flat.with_columns(pl.col("tok").cast(pl.Int64))
    users = flat.filter(pl.col("pos") == 0).select("line", user_id="tok")
    repeated = users.filter(pl.col("user_id").is_duplicated()).head(2)
    if repeated.height:
        (l1, uid), (l2, _) = repeated.rows()
        raise ContractError(f"{path}: lines {l1} and {l2}: user id {uid} appears twice; "
                            f"expected one line per user")
    return (flat.filter(pl.col("pos") > 0)
            .join(users, on="line", how="left")
            .select("user_id", item_id="tok", ts=(pl.col("pos") - 1).cast(pl.Int64),
                    event=pl.lit(EVENT))
            .sort("user_id", "ts"))


def read_attributes(path: Path) -> pl.DataFrame:
    """Parse `<name>_item2attributes.json` into (item_id, attrs: sorted distinct list[int64])."""
    try:
        data = _ATTRIBUTES.validate_json(path.read_bytes())
    except ValidationError as exc:
        err = exc.errors()[0]
        where = "/".join(str(p) for p in err["loc"]) or "<top level>"
        raise ContractError(f"{path}: at {where}: {err['msg']} (input {_short(err.get('input'))}); "
                            f"expected {EXPECTED_JSON} ({exc.error_count()} error(s))") from None
    return pl.DataFrame(
        {"item_id": pl.Series(list(data.keys()), dtype=pl.String).cast(pl.Int64),
         "attrs": pl.Series(list(data.values()), dtype=pl.List(pl.Int64))}
    ).with_columns(pl.col("attrs").list.unique().list.sort()).sort("item_id")


def read_s3rec(name: str, src: str | Path) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(interactions, attributes) of one S3-Rec dataset, checked against each other."""
    seq_path, attr_path = source_paths(name, src)
    interactions = read_sequences(seq_path)
    attributes = read_attributes(attr_path)
    missing = (interactions.select("item_id").unique()
               .join(attributes, on="item_id", how="anti").sort("item_id"))
    if missing.height:
        item = missing["item_id"][0]
        user = interactions.filter(pl.col("item_id") == item)["user_id"].min()
        raise ContractError(f"{attr_path}: no entry for item {item} (on the line of user {user} "
                            f"in {seq_path}; {missing.height} item(s) missing); expected an "
                            f"attribute list for every item of the sequences")
    unused = attributes.join(interactions.select("item_id").unique(), on="item_id", how="anti")
    if unused.height:
        raise ContractError(f"{attr_path}: item {unused['item_id'][0]} never occurs in {seq_path} "
                            f"({unused.height} such item(s)); expected the 5-core item set, every "
                            f"item with interactions")
    return interactions, attributes


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ContractError(f"{path}: not UTF-8 text at byte {exc.start}; expected "
                            f"{EXPECTED_LINE} per line") from None


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# --------------------------------------------------------------------------- building


def cold_cohort(item_ids: np.ndarray, share: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask: a seeded `round(share * n)` items, drawn uniformly (ids in sorted order)."""
    n_cold = int(round(share * len(item_ids)))
    mask = np.zeros(len(item_ids), dtype=bool)
    mask[rng.choice(len(item_ids), size=n_cold, replace=False)] = True
    return mask


def price_groups(attributes: pl.DataFrame) -> pl.Series:
    """Each item's group: its most frequent attribute among those held by < half of the items.

    Attributes held by half the items or more (Toys' root category is on every item) say
    nothing about the kind of product; ties go to the smaller id. Null when none is left.
    """
    n = attributes.height
    flat = attributes.explode("attrs").drop_nulls("attrs")
    freq = flat.group_by("attrs").agg(n_items=pl.len())
    best = (flat.join(freq, on="attrs").filter(pl.col("n_items") < n / 2)
            .sort(["item_id", "n_items", "attrs"], descending=[False, True, False])
            .group_by("item_id", maintain_order=True).first())
    return (attributes.select("item_id").join(best, on="item_id", how="left")
            .select(pl.format("attr_{}", pl.col("attrs")).alias("category"))["category"])


def simulate_prices(groups: pl.Series, cfg: AmazonConfig, rng: np.random.Generator
                    ) -> tuple[np.ndarray, dict[str, float]]:
    """Log-normal prices: group median ~ LogN(log price_median, group_sigma), item noise
    ~ LogN(0, item_sigma); rounded to cents, at least $0.01. Returns (prices, group medians)."""
    labels = groups.fill_null("<none>")
    names = labels.unique().sort()
    medians = cfg.price_median * np.exp(cfg.group_sigma * rng.standard_normal(len(names)))
    index = labels.replace_strict(names, pl.int_range(len(names), eager=True)).to_numpy()
    prices = medians[index] * np.exp(cfg.item_sigma * rng.standard_normal(len(labels)))
    prices = np.maximum(np.round(prices, 2), 0.01)
    return prices, {str(k): round(float(v), 4) for k, v in zip(names, medians)}


def truncated_svd(a: sp.spmatrix | np.ndarray, k: int, rng: np.random.Generator,
                  power_iters: int = 6, oversample: int = 16
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded randomized SVD (Halko et al. 2011, alg. 4.4): top min(k, rank bound) triplets.

    Each singular vector's sign is fixed (largest |u| entry positive), so the result
    depends on the matrix and the generator only.
    """
    m, n = a.shape
    r = min(k, m, n)
    width = min(r + oversample, m, n)
    q, _ = np.linalg.qr(a @ rng.standard_normal((n, width)))
    for _ in range(power_iters):
        z, _ = np.linalg.qr(a.T @ q)
        q, _ = np.linalg.qr(a @ z)
    u_small, s, vt = np.linalg.svd(np.asarray((a.T @ q).T), full_matrices=False)
    u = (q @ u_small)[:, :r]
    s, vt = s[:r], vt[:r]
    sign = np.sign(u[np.argmax(np.abs(u), axis=0), np.arange(r)])
    sign[sign == 0] = 1.0
    return u * sign, s, vt * sign[:, None]


def _embed(ppmi: sp.csr_matrix, k: int, rng: np.random.Generator, cfg: AmazonConfig
           ) -> np.ndarray:
    """Rows of U sqrt(S) (k columns, zero-padded when the rank bound is lower), L2-normalised."""
    u, s, _ = truncated_svd(ppmi, k, rng, cfg.svd_power_iters, cfg.svd_oversample)
    emb = np.zeros((ppmi.shape[0], k))
    emb[:, : u.shape[1]] = u * np.sqrt(s)
    return _normalise(emb)


def _normalise(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 1e-12)


def _positive_log(m: sp.coo_matrix, log_scale: np.ndarray) -> sp.csr_matrix:
    """max(0, log(m_ij) + log_scale_ij) on m's non-zeros (the PPMI of counts)."""
    values = np.log(m.data) + log_scale
    keep = values > 0
    return sp.csr_matrix((values[keep], (m.row[keep], m.col[keep])), shape=m.shape)


def attribute_ppmi(attributes: pl.DataFrame) -> tuple[sp.csr_matrix, int]:
    """PPMI of the binary item x attribute matrix (rows in `attributes` order), and #attributes.

    PMI(i, a) = log(N / (|attrs(i)| * n_items(a))) with N the number of (item, attribute) pairs.
    """
    flat = attributes.with_row_index("row").explode("attrs").drop_nulls("attrs")
    codes = flat["attrs"].rank("dense").cast(pl.Int64).to_numpy() - 1
    rows = flat["row"].to_numpy().astype(np.int64)
    n_attr = int(codes.max()) + 1 if len(codes) else 0
    x = sp.coo_matrix((np.ones(len(rows)), (rows, codes)), shape=(attributes.height, n_attr))
    item_len = np.bincount(rows, minlength=attributes.height)
    attr_freq = np.bincount(codes, minlength=n_attr)
    scale = np.log(len(rows)) - np.log(item_len[x.row]) - np.log(attr_freq[x.col])
    return _positive_log(x, scale), n_attr


def cooccurrence_ppmi(train: pl.DataFrame, item_ids: np.ndarray, window: int,
                      context_power: float) -> sp.csr_matrix:
    """PPMI of symmetric item-item co-occurrence within `window` positions of each user's
    training sequence (ordered by ts); rows/columns in `item_ids` order."""
    ordered = train.sort("user_id", "ts", "item_id")
    users = ordered["user_id"].to_numpy()
    rows = np.searchsorted(item_ids, ordered["item_id"].to_numpy())
    pairs_a, pairs_b = [], []
    for d in range(1, window + 1):  # a loop over offsets, vectorized over all users
        same = users[:-d] == users[d:]
        pairs_a.append(rows[:-d][same])
        pairs_b.append(rows[d:][same])
    a = np.concatenate(pairs_a + pairs_b)
    b = np.concatenate(pairs_b + pairs_a)
    n = len(item_ids)
    c = sp.coo_matrix((np.ones(len(a)), (a, b)), shape=(n, n)).tocsr().tocoo()  # sums repeats
    total = np.asarray(c.sum(axis=1)).ravel()
    context = total ** context_power
    context_share = context / max(context.sum(), 1e-300)
    with np.errstate(divide="ignore"):
        scale = -np.log(total[c.row]) - np.log(context_share[c.col])
    return _positive_log(c, scale)


def impute_from_neighbours(attr_part: np.ndarray, collab: np.ndarray, targets: np.ndarray,
                           donors: np.ndarray, k: int, chunk: int = 512) -> np.ndarray:
    """Collaborative parts for `targets` rows: the mean over the donor rows whose attribute
    cosine is at least the k-th highest (all ties included), re-normalised."""
    out = np.zeros((len(targets), collab.shape[1]))
    if len(donors) == 0:
        return out
    k = min(k, len(donors))
    donor_attr, donor_collab = attr_part[donors], collab[donors]
    for start in range(0, len(targets), chunk):  # chunks bound memory, not a per-item loop
        sim = attr_part[targets[start:start + chunk]] @ donor_attr.T
        kth = np.partition(sim, -k, axis=1)[:, -k:].min(axis=1, keepdims=True)
        weight = (sim >= kth - 1e-9).astype(np.float64)
        out[start:start + chunk] = (weight @ donor_collab) / weight.sum(axis=1, keepdims=True)
    return _normalise(out)


def text_part(embedding: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    """PCA of sentence embeddings to `k` dimensions, L2-normalised rows, and the share of the
    variance kept. Exact SVD of the centred matrix (no randomness); each component's sign is
    fixed so its largest loading is positive (the same bytes on every run)."""
    x = np.asarray(embedding, dtype=np.float64)
    x = x - x.mean(axis=0)
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    k_eff = min(k, len(s))
    sign = np.sign(vt[np.arange(k_eff), np.abs(vt[:k_eff]).argmax(axis=1)])
    part = np.zeros((x.shape[0], k))
    part[:, :k_eff] = u[:, :k_eff] * s[:k_eff] * sign
    kept = float((s[:k_eff] ** 2).sum() / max((s**2).sum(), 1e-300))
    return _normalise(part), kept


def part_dims(dim: int, parts: tuple[str, ...]) -> dict[str, int]:
    """Each part's dimensions: dim // parts, the last part the remainder."""
    base = dim // len(parts)
    return {p: base if i < len(parts) - 1 else dim - base * (len(parts) - 1)
            for i, p in enumerate(parts)}


def build_items(interactions: pl.DataFrame, attributes: pl.DataFrame, seed: int,
                cfg: AmazonConfig, text_embedding: np.ndarray | None = None
                ) -> tuple[pl.DataFrame, dict]:
    """The items table (content, category, price, is_cold) and the figures for the card.

    `text_embedding`: (items, d) sentence embeddings in `attributes`' item order, needed
    when the recipe has a text part."""
    if cfg.dim < 2:
        raise ContractError(f"dim={cfg.dim}: expected at least 2 (attribute + collaborative part)")
    if not 0.0 <= cfg.cold_share < 1.0:
        raise ContractError(f"cold_share={cfg.cold_share}: expected a share in [0, 1)")
    rng_cold, rng_price, rng_attr, rng_collab = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(4))
    item_ids = attributes["item_id"].to_numpy()
    drawn = cold_cohort(item_ids, cfg.cold_share, rng_cold)
    train = leave_one_out(interactions, cold_items=pl.Series(item_ids[drawn])).train
    # An item whose every interaction is a validation or test target has no training
    # interactions either: it is cold by the contract's definition, drawn or not.
    unseen = ~np.isin(item_ids, train["item_id"].unique().to_numpy()) & ~drawn
    is_cold = drawn | unseen
    groups = price_groups(attributes)
    prices, medians = simulate_prices(groups, cfg, rng_price)

    dims = part_dims(cfg.dim, cfg.parts)
    if min(dims.values()) < 1:
        raise ContractError(f"dim={cfg.dim}: expected at least one dimension per content part "
                            f"({', '.join(cfg.parts)})")
    parts: dict[str, np.ndarray] = {}
    text_kept = None
    if "text" in dims:
        if text_embedding is None or len(text_embedding) != len(item_ids):
            raise ContractError(f"content {cfg.content!r}: the text part needs one text "
                                f"embedding per item ({len(item_ids)})")
        parts["text"], text_kept = text_part(text_embedding, dims["text"])
    attr_ppmi, n_attr = attribute_ppmi(attributes)
    if "attributes" in dims:
        parts["attributes"] = _embed(attr_ppmi, dims["attributes"], rng_attr, cfg)
    has_signal = ~is_cold
    if "cooccurrence" in dims:
        collab = _embed(cooccurrence_ppmi(train, item_ids, cfg.window, cfg.context_power),
                        dims["cooccurrence"], rng_collab, cfg)
        has_signal = (np.linalg.norm(collab, axis=1) > 0) & ~is_cold
        imputed = np.flatnonzero(~has_signal)
        others = _normalise(np.hstack([parts[p] for p in parts]))
        collab[imputed] = impute_from_neighbours(others, collab, imputed,
                                                 np.flatnonzero(has_signal), cfg.neighbors)
        parts["cooccurrence"] = collab
    content = (np.hstack([parts[p] for p in cfg.parts]) / np.sqrt(len(cfg.parts))
               ).astype(np.float32)

    items = pl.DataFrame({
        "item_id": item_ids,
        "content": pl.Series(content).cast(pl.List(pl.Float32)),
        "category": groups,
        "price": prices,
        "is_cold": is_cold,
    })
    figures = {
        "attributes": n_attr,
        "price_groups": len(medians),
        "price_group_medians": medians,
        "train_interactions": train.height,
        "cold_drawn": int(drawn.sum()),
        "cold_unseen": int(unseen.sum()),
        "warm_items_imputed": int(np.sum(~has_signal & ~is_cold)),
        "part_dims": dims, "text_variance_kept": text_kept,
        "duplicates": duplicate_report(content, is_cold, attributes),
    }
    return items, figures


# --------------------------------------------------------------------------- reporting


def duplicate_mask(x: np.ndarray) -> np.ndarray:
    """Rows whose exact bytes equal another row's."""
    rows = np.ascontiguousarray(x).view(np.dtype((np.void, x.dtype.itemsize * x.shape[1])))
    _, inverse, count = np.unique(rows.ravel(), return_inverse=True, return_counts=True)
    return count[inverse] > 1


def nearest_cosine(x: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """Each row's highest cosine to another row."""
    unit = _normalise(x.astype(np.float64)).astype(np.float32)
    best = np.empty(len(x), dtype=np.float32)
    for start in range(0, len(x), chunk):  # chunks bound memory
        sim = unit[start:start + chunk] @ unit.T
        sim[np.arange(sim.shape[0]), np.arange(start, start + sim.shape[0])] = -np.inf
        best[start:start + chunk] = sim.max(axis=1)
    return best


def duplicate_report(content: np.ndarray, is_cold: np.ndarray, attributes: pl.DataFrame) -> dict:
    """Shares of items whose content duplicates another item's (exactly, and at cosine >= 0.99),
    for warm and cold items, beside the share whose attribute set is not unique."""
    dup = duplicate_mask(content)
    near = nearest_cosine(content) >= 0.99
    same_set = attributes.select(pl.col("attrs").is_duplicated())["attrs"].to_numpy()

    def share(mask: np.ndarray, among: np.ndarray) -> float:
        return round(float(mask[among].mean()), 6) if among.any() else 0.0

    return {
        "attribute_set_shared": share(same_set, np.ones_like(is_cold)),
        "content_exact_warm": share(dup, ~is_cold),
        "content_exact_cold": share(dup, is_cold),
        "content_cosine_ge_0.99_warm": share(near, ~is_cold),
        "content_cosine_ge_0.99_cold": share(near, is_cold),
    }


def datacard(name: str, paths: tuple[Path, Path], seed: int, cfg: AmazonConfig,
             items: pl.DataFrame, interactions: pl.DataFrame, figures: dict) -> dict:
    """The data card: source, seed, counts, what is real, simulated and derived, and how."""
    cold = int(items["is_cold"].sum())
    return {
        "name": name,
        "source": "Amazon review data, 5-core (McAuley et al. 2014), S3-Rec packaging",
        "source_files": {p.name: file_digest(p) for p in paths},
        "seed": seed,
        "config": cfg.model_dump(),
        "counts": {**counts(items, interactions), "attributes": figures["attributes"],
                   "train_interactions": figures["train_interactions"]},
        "cutoff_ts": None,
        "real": [
            "users, items and each user's item order (ts = position in the user's line, "
            "0-based; the source has no timestamps)",
            "item attribute sets (anonymous brand and category ids)",
        ],
        "simulated": [
            "prices (the source has none): see prices",
            "the cold cohort: see cold_items",
        ],
        "derived": ["content embedding: see content", "category: see prices"],
        "events": {EVENT: "a review in the source (one per user and item position)"},
        "split": "leave-one-out per user (last = test, second last = validation); the "
                 "collaborative content part sees the train portion only, without cold items",
        "prices": {
            "method": "log-normal per attribute group: group median = price_median * "
                      "exp(group_sigma * z_g), item price = group median * exp(item_sigma * "
                      "z_i), z ~ N(0, 1) seeded; rounded to cents, at least 0.01",
            "group": "category = attr_<id>: the item's most frequent attribute among those "
                     "held by fewer than half of the items (ties: smaller id)",
            "price_median": cfg.price_median, "group_sigma": cfg.group_sigma,
            "item_sigma": cfg.item_sigma, "groups": figures["price_groups"],
            "group_medians": figures["price_group_medians"],
        },
        "cold_items": {
            "method": f"a seeded uniform draw of {cfg.cold_share:.0%} of items (exact count "
                      "round(share * items)), plus the items none of whose interactions is in "
                      "the leave-one-out train portion (each is a validation or test target "
                      "only); cold items' interactions stay in interactions.parquet and must "
                      "be dropped from training (leave_one_out(cold_items=...))",
            "count": cold, "share": round(cold / max(1, items.height), 6),
            "drawn": figures["cold_drawn"], "unseen_in_train": figures["cold_unseen"],
        },
        "content": {
            "dim": cfg.dim,
            "recipe": cfg.content,
            "layout": " | ".join(f"{p} part ({d})" for p, d in figures["part_dims"].items())
                      + f", each L2-normalised, times 1/sqrt({len(cfg.parts)}): unit norm, "
                      "cosine = mean of the parts' cosines",
            "text_part": None if "text" not in cfg.parts else
                f"the item text ({figures.get('text_encoder')} sentence embedding of "
                f"<name>_item_text.tsv), PCA to {figures['part_dims']['text']} dimensions "
                f"(variance kept {figures['text_variance_kept']:.3f}), L2-normalised",
            "attribute_part": "PPMI of the binary item x attribute matrix, seeded randomized "
                              "truncated SVD, rows U sqrt(S)",
            "collaborative_part": f"PPMI (context smoothing {cfg.context_power}) of item-item "
                                  f"co-occurrence within {cfg.window} positions in the training "
                                  "sequences, seeded randomized truncated SVD, rows U sqrt(S)",
            "imputed": None if "cooccurrence" not in cfg.parts else
                f"cold items and warm items without training co-occurrence "
                f"({figures['warm_items_imputed']}): mean collaborative part of the "
                f"{cfg.neighbors} nearest warm items by the cosine of the other parts (ties "
                "included), re-normalised",
            "duplicate_shares": figures["duplicates"],
        },
    }


def import_amazon(name: str, src: str | Path, out: str | Path, seed: int = 0, dim: int = 64,
                  config: AmazonConfig | None = None, content: str | None = None,
                  encoder: TextEncoder | None = None, cache_dir: Path | None = None) -> dict:
    """Import one S3-Rec dataset into `out` (items, interactions, data card); returns the card.

    `config` overrides every setting but `dim` (and `content`, the recipe, when given). The
    text part embeds `<name>_item_text.tsv` with `encoder` (default: the sentence encoder of
    the `text` extra), cached under `cache_dir`. Bad input raises `ContractError` naming the
    file, the line or key and what was expected; nothing is written then.
    """
    changes = {"dim": dim} | ({"content": content} if content is not None else {})
    try:
        cfg = merge(config or AmazonConfig(), changes, "import_amazon")
    except ValueError as exc:
        raise ContractError(str(exc)) from None
    paths = source_paths(name, src)
    interactions, attributes = read_s3rec(name, src)
    text_embedding, encoder_name = None, None
    if "text" in cfg.parts:
        text_path = Path(src) / f"{name}_item_text.tsv"
        texts = read_item_text(text_path, attributes["item_id"].to_numpy())
        encoder = encoder or SentenceEncoder()
        text_embedding, encoder_name = embed_texts(texts, encoder, cache_dir), encoder.name
        paths = (*paths, text_path)
    items, figures = build_items(interactions, attributes, seed, cfg, text_embedding)
    figures["text_encoder"] = encoder_name
    card = datacard(name, paths, seed, cfg, items, interactions, figures)
    write_dataset(out, items, interactions, card)
    return card
