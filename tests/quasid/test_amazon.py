"""The Amazon import: parsing and its errors, content embedding, cohorts, prices, determinism.

A fake S3-Rec dataset (written into tmp_path) exercises the code without the real data;
the real Beauty and Toys files (`amazon_dir`) are checked against their published counts.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from quasid.core.schemas import ContractError
from quasid.data.amazon import (
    AmazonConfig,
    attribute_ppmi,
    build_items,
    cooccurrence_ppmi,
    import_amazon,
    read_s3rec,
    truncated_svd,
)
from quasid.data.dataset import content_matrix, load_dataset
from quasid.data.splits import leave_one_out

FILES = ("items.parquet", "interactions.parquet", "datacard.json")


def write_fake_s3rec(root: Path, name: str = "Beauty", n_users: int = 120, n_items: int = 70,
                     seed: int = 0) -> tuple[list[list[int]], dict[str, list[int]]]:
    """A small S3-Rec dataset: 4 categories, 5 brands (many items share an attribute set),
    users who mostly browse one category; every item occurs. Returns (lines, attributes)."""
    rng = np.random.default_rng(seed)
    cat = rng.integers(0, 4, n_items)
    attributes = {str(i + 1): [int(cat[i]) + 1, int(rng.integers(5, 10))] for i in range(n_items)}
    lines = []
    for user in range(1, n_users + 1):
        home = rng.integers(0, 4)
        pool = np.flatnonzero(cat == home) + 1
        length = int(rng.integers(5, 10))
        own = rng.choice(pool, size=length)
        other = rng.integers(1, n_items + 1, size=length)
        seq = np.where(rng.random(length) < 0.8, own, other)
        lines.append([user, *map(int, seq)])
    seen = {i for line in lines for i in line[1:]}
    for item in range(1, n_items + 1):  # make every item occur, early in some line
        if item not in seen:
            lines[item % n_users].insert(1, item)
    write_s3rec(root, name, lines, attributes)
    return lines, attributes


def write_s3rec(root: Path, name: str, lines: list[list[int]], attributes: dict) -> None:
    """Write `<name>.txt` and `<name>_item2attributes.json` under `root`."""
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{name}.txt").write_text("".join(" ".join(map(str, ln)) + "\n" for ln in lines))
    (root / f"{name}_item2attributes.json").write_text(json.dumps(attributes))


@pytest.fixture
def fake(tmp_path) -> tuple[Path, list[list[int]], dict]:
    src = tmp_path / "src"
    lines, attributes = write_fake_s3rec(src)
    return src, lines, attributes


def _unseen_in_train(lines: list[list[int]], n_items: int) -> set[int]:
    """Items that occur only as a user's last or second-last item (hand-computed)."""
    train = {i for ln in lines for i in ln[1:-2]}
    return set(range(1, n_items + 1)) - train


# --------------------------------------------------------------------------- fake data


def test_fake_import_keeps_the_source_and_flags_cohorts(fake, tmp_path):
    src, lines, attributes = fake
    card = import_amazon("Beauty", src, tmp_path / "out", seed=3, dim=8)
    ds = load_dataset(tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(FILES)

    expected = pl.DataFrame(
        [(ln[0], item, ts) for ln in lines for ts, item in enumerate(ln[1:])],
        schema={"user_id": pl.Int64, "item_id": pl.Int64, "ts": pl.Int64}, orient="row")
    assert ds.interactions.select("user_id", "item_id", "ts").sort("user_id", "ts").equals(
        expected.sort("user_id", "ts"))
    assert set(ds.interactions["event"]) == {"review"}
    assert ds.items["item_id"].to_list() == list(range(1, 71))
    assert card["counts"]["users"] == 120 and card["counts"]["items"] == 70
    assert card["counts"]["interactions"] == sum(len(ln) - 1 for ln in lines)

    cold = set(ds.items.filter("is_cold")["item_id"])
    unseen = _unseen_in_train(lines, 70)
    assert unseen <= cold
    assert card["cold_items"]["drawn"] == 7  # round(0.1 * 70)
    assert len(cold - unseen) <= 7  # the rest is the seeded draw
    assert len(cold) == card["cold_items"]["count"] == 7 + card["cold_items"]["unseen_in_train"]
    train = leave_one_out(ds.interactions, cold_items=pl.Series(sorted(cold))).train
    assert set(train["item_id"]) == set(range(1, 71)) - cold  # warm <=> has training data

    x = ds.content()
    assert x.shape == (70, 8) and x.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(x[:, :4], axis=1), np.sqrt(0.5), atol=1e-5)
    dup = ds.items.select(pl.col("content").is_duplicated())["content"]
    warm = ~ds.items["is_cold"]
    assert card["content"]["duplicate_shares"]["content_exact_warm"] == 0.0
    assert not dup.filter(warm).any()
    # items with the same attribute set get the same attribute part
    same = [k for k, v in attributes.items() if v == attributes["1"]]
    assert len(same) > 1
    rows = ds.items.with_row_index().filter(pl.col("item_id").is_in([int(k) for k in same]))
    np.testing.assert_array_equal(x[rows["index"].to_numpy(), :4],
                                  np.repeat(x[rows["index"][0], None, :4], rows.height, axis=0))


def test_cold_items_get_the_mean_collaborative_part_of_their_nearest_warm_items(fake, tmp_path):
    src, _, _ = fake
    import_amazon("Beauty", src, tmp_path / "out", seed=1, dim=8,
                  config=AmazonConfig(neighbors=4))
    items = load_dataset(tmp_path / "out").items
    x = content_matrix(items).astype(np.float64) * np.sqrt(2.0)
    attr, collab = x[:, :4], x[:, 4:]
    cold = items["is_cold"].to_numpy()
    warm = np.flatnonzero(~cold)
    for i in np.flatnonzero(cold):  # a test may loop: few items, independent recount
        sim = attr[warm] @ attr[i]
        kth = np.sort(sim)[-4]
        mean = collab[warm[sim >= kth - 1e-6]].mean(axis=0)
        np.testing.assert_allclose(collab[i], mean / np.linalg.norm(mean), atol=1e-4)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s, a: s.replace("\n", "\n7 x 3\n", 1), r"Beauty.txt: line 2, token 2: 'x'"),
        (lambda s, a: s.replace("\n", "\n500\n", 1),
         r"Beauty.txt: line 2: expected .* at least one item id"),
        (lambda s, a: s.replace("\n", "\n0 1 2\n", 1), r"line 2, token 1: '0' is not a positive"),
        (lambda s, a: s.replace("\n", "\n\n", 1), r"line 2: expected .* found 0 token"),
        (lambda s, a: s + "1 2 3\n", r"lines 1 and 121: user id 1 appears twice"),
        (lambda s, a: s + "999 2 71\n", r"item2attributes.json: no entry for item 71"),
    ],
    ids=["bad-token", "no-items", "zero-id", "blank-line", "repeated-user", "unknown-item"],
)
def test_malformed_sequences_name_file_and_line_and_write_nothing(fake, tmp_path, edit, message):
    src, _, attributes = fake
    seq = src / "Beauty.txt"
    seq.write_text(edit(seq.read_text(), attributes))
    out = tmp_path / "out"
    with pytest.raises(ContractError, match=message):
        import_amazon("Beauty", src, out)
    assert not out.exists()
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())  # no staging left


@pytest.mark.parametrize(
    ("attributes", "message"),
    [
        ('{"1": [1, 2], "2": [3', r"item2attributes.json: at <top level>: Invalid JSON"),
        ('[[1, 2]]', r"at <top level>: Input should be an object \(input \[\[1, 2\]\]\)"),
        ('{"1": [1, "a"]}', r"at 1/1: Input should be a valid integer .*'a'"),
        ('{"1": [1, true]}', r"at 1/1: Input should be a valid integer"),
        ('{"x1": [1]}', r"at x1/\[key\]: String should match pattern"),
    ],
    ids=["truncated", "not-an-object", "string-attr", "bool-attr", "bad-key"],
)
def test_malformed_attributes_name_file_and_key(fake, tmp_path, attributes, message):
    src, _, _ = fake
    (src / "Beauty_item2attributes.json").write_text(attributes)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("before")
    with pytest.raises(ContractError, match=message):
        import_amazon("Beauty", src, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_attributes_of_an_item_without_interactions_are_an_error(fake):
    src, _, attributes = fake
    (src / "Beauty_item2attributes.json").write_text(json.dumps({**attributes, "71": [1]}))
    with pytest.raises(ContractError, match=r"item 71 never occurs in .*Beauty.txt"):
        read_s3rec("Beauty", src)


def test_wrong_name_and_missing_files(fake, tmp_path):
    src, _, _ = fake
    # any S3-Rec name imports when its files are there; without them the error says which
    with pytest.raises(ContractError, match=r"Books.txt: file not found .*known datasets: "
                                            r"Beauty, Toys_and_Games"):
        import_amazon("Books", src, tmp_path / "out")
    with pytest.raises(ContractError, match=r"--name '\.\./x': expected a dataset name"):
        import_amazon("../x", src, tmp_path / "out")
    with pytest.raises(ContractError, match=r"Toys_and_Games.txt: file not found"):
        import_amazon("Toys_and_Games", src, tmp_path / "out")
    (src / "Beauty_item2attributes.json").unlink()
    with pytest.raises(ContractError, match=r"Beauty_item2attributes.json: file not found"):
        import_amazon("Beauty", src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_import_amazon(fake, tmp_path):
    from flows.cli import app

    src, _, _ = fake
    runner = CliRunner()
    res = runner.invoke(app, ["data", "import-amazon", "--name", "Beauty", "--src", str(src),
                              "--out", str(tmp_path / "out"), "--seed", "5", "--dim", "6"])
    assert res.exit_code == 0, res.output
    card = json.loads((tmp_path / "out" / "datacard.json").read_text())
    assert card["seed"] == 5 and card["content"]["dim"] == 6 and card["name"] == "Beauty"
    res = runner.invoke(app, ["data", "import-amazon", "--name", "Books", "--src", str(src),
                              "--out", str(tmp_path / "bad")])
    assert res.exit_code == 2
    assert "Books.txt: file not found" in res.output and not (tmp_path / "bad").exists()


# --------------------------------------------------------------------------- building blocks


def test_cooccurrence_ppmi_by_hand():
    # one user 1 2 3, window 1, no smoothing: counts (1,2), (2,3) both ways, totals 1, 2, 1
    # of 4 pairs, so PMI = log(c * 4 / (r_i r_j)) = log 2 on every co-occurring pair
    train = pl.DataFrame({"user_id": [1, 1, 1], "item_id": [1, 2, 3], "ts": [0, 1, 2]})
    m = cooccurrence_ppmi(train, np.array([1, 2, 3]), window=1, context_power=1.0).toarray()
    l2 = np.log(2.0)
    np.testing.assert_allclose(m, [[0, l2, 0], [l2, 0, l2], [0, l2, 0]])
    # a second user separates windows: the pair (3, 4) across users never counts
    two = pl.DataFrame({"user_id": [1, 1, 2, 2], "item_id": [1, 3, 4, 2], "ts": [0, 1, 0, 1]})
    m = cooccurrence_ppmi(two, np.array([1, 2, 3, 4]), window=3, context_power=1.0).toarray()
    assert m[2, 3] == 0 and m[0, 2] > 0 and m[1, 3] > 0


def test_attribute_ppmi_by_hand():
    # items {1: [1, 2], 2: [1]}: N = 3 pairs; PMI(i, a) = log(N / (|attrs(i)| * freq(a)))
    attrs = pl.DataFrame({"item_id": [1, 2], "attrs": [[1, 2], [1]]})
    m, n_attr = attribute_ppmi(attrs)
    assert n_attr == 2
    np.testing.assert_allclose(m.toarray(), [[0.0, np.log(1.5)], [np.log(1.5), 0.0]])


def test_truncated_svd_matches_lapack():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((300, 8)) @ rng.standard_normal((8, 120))
    a += 0.01 * rng.standard_normal(a.shape)
    u, s, vt = truncated_svd(a, 6, np.random.default_rng(1))
    u_ref, s_ref, vt_ref = np.linalg.svd(a, full_matrices=False)
    np.testing.assert_allclose(s, s_ref[:6], rtol=1e-8)
    np.testing.assert_allclose(np.abs(u.T @ u_ref[:, :6]), np.eye(6), atol=1e-6)
    np.testing.assert_allclose(u * s @ vt, u_ref[:, :6] * s_ref[:6] @ vt_ref[:6], atol=1e-8)
    u2, _, _ = truncated_svd(a, 6, np.random.default_rng(2))
    np.testing.assert_allclose(u2, u, atol=1e-8)  # sign fixed: seed-independent vectors
    u_small, s_small, _ = truncated_svd(a[:5, :4], 6, np.random.default_rng(1))
    assert u_small.shape == (5, 4)  # rank bound below k: as many as exist
    np.testing.assert_allclose(s_small, np.linalg.svd(a[:5, :4], compute_uv=False), rtol=1e-10)


# --------------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def beauty(amazon_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("beauty") / "Beauty"
    import_amazon("Beauty", amazon_dir, out, seed=0)
    return out


@pytest.mark.amazon
@pytest.mark.slow
def test_beauty_counts_cohorts_and_duplicates(beauty):
    ds = load_dataset(beauty)
    card = ds.datacard
    assert (ds.interactions["user_id"].n_unique(), ds.items.height, ds.interactions.height) == (
        22_363, 12_101, 198_502)
    assert card["counts"]["users"] == 22_363 and card["counts"]["interactions"] == 198_502
    assert ds.interactions["ts"].max() == ds.interactions.group_by("user_id").len()["len"].max() - 1
    cold = ds.items["is_cold"]
    assert card["cold_items"]["drawn"] == 1_210
    assert 0.095 <= cold.mean() <= 0.11
    untrained = set(ds.items["item_id"]) - set(leave_one_out(ds.interactions).train["item_id"])
    assert untrained <= set(ds.items.filter(cold)["item_id"])
    assert cold.sum() - 1_210 == card["cold_items"]["unseen_in_train"] <= len(untrained)
    dup = ds.items.select(pl.col("content").is_duplicated())["content"]
    assert not dup.filter(~cold).any()  # warm items: 0% duplicate content
    shares = card["content"]["duplicate_shares"]
    assert shares["content_exact_warm"] == 0.0
    assert shares["content_exact_cold"] == pytest.approx(dup.filter(cold).mean(), abs=1e-6)
    assert shares["attribute_set_shared"] == pytest.approx(0.86, abs=0.005)  # the data README


@pytest.mark.amazon
@pytest.mark.slow
def test_beauty_prices_follow_the_documented_lognormal(beauty):
    ds = load_dataset(beauty)
    medians = ds.datacard["prices"]["group_medians"]
    stats = (ds.items.group_by("category")
             .agg(n=pl.len(), med=pl.col("price").median(), sd=pl.col("price").log().std()))
    assert stats.height == len(medians) == 7
    for cat, n, med, sd in stats.iter_rows():
        if n >= 300:  # sd of a log-normal sample of 300+: within 0.05 of 0.6 at >3 sigma
            assert sd == pytest.approx(0.6, abs=0.05), cat
            assert med == pytest.approx(medians[cat], rel=0.12), cat


@pytest.mark.amazon
@pytest.mark.slow
def test_beauty_same_seed_same_bytes_other_seed_differs(beauty, amazon_dir, tmp_path):
    import_amazon("Beauty", amazon_dir, tmp_path / "again", seed=0)
    for name in FILES:
        assert (tmp_path / "again" / name).read_bytes() == (beauty / name).read_bytes(), name
    import_amazon("Beauty", amazon_dir, tmp_path / "other", seed=1)
    a, b = load_dataset(beauty).items, load_dataset(tmp_path / "other").items
    assert (tmp_path / "other" / "items.parquet").read_bytes() != (beauty / "items.parquet"
                                                                   ).read_bytes()
    assert (a["is_cold"] != b["is_cold"]).sum() > 1_000
    assert (a["price"] != b["price"]).mean() > 0.9
    # the interactions are the source's: no randomness in them
    assert (tmp_path / "other" / "interactions.parquet").read_bytes() == (
        beauty / "interactions.parquet").read_bytes()


def _rotate(interactions: pl.DataFrame, from_end: int) -> pl.DataFrame:
    """Move each user's item at position `from_end` (0 = last) to the next user (a cycle),
    so every item keeps its number of interactions."""
    ranked = interactions.with_columns(
        k=pl.len().over("user_id") - pl.col("ts") - 1)
    hit = ranked.filter(pl.col("k") == from_end).sort("user_id")
    moved = hit.with_columns(pl.col("item_id").shift(1, fill_value=hit["item_id"][-1]))
    return pl.concat([ranked.filter(pl.col("k") != from_end), moved]).drop("k").sort(
        "user_id", "ts")


def _check_training_only(interactions: pl.DataFrame, attributes: pl.DataFrame,
                         cfg: AmazonConfig) -> None:
    base, _ = build_items(interactions, attributes, 0, cfg)
    # the validation and test items of every user move to another user: no content changes
    moved = _rotate(_rotate(interactions, 0), 1)
    assert (moved["item_id"] != interactions["item_id"]).sum() > 0.8 * 2 * moved[
        "user_id"].n_unique()
    same, _ = build_items(moved, attributes, 0, cfg)
    assert same.equals(base)
    # the same move one position earlier (a training position) changes the warm content
    changed, _ = build_items(_rotate(interactions, 2), attributes, 0, cfg)
    assert changed["is_cold"].equals(base["is_cold"])  # training item set is unchanged
    differs = (content_matrix(changed) != content_matrix(base)).any(axis=1)
    assert differs[~base["is_cold"].to_numpy()].mean() > 0.5


def test_content_uses_training_interactions_only_fake(fake):
    src, _, _ = fake
    _check_training_only(*read_s3rec("Beauty", src), AmazonConfig(dim=8))


@pytest.mark.amazon
@pytest.mark.slow
def test_content_uses_training_interactions_only(amazon_dir):
    _check_training_only(*read_s3rec("Beauty", amazon_dir), AmazonConfig())


@pytest.mark.amazon
@pytest.mark.slow
def test_toys_counts_and_warm_duplicates(amazon_dir, tmp_path):
    card = import_amazon("Toys_and_Games", amazon_dir, tmp_path / "toys", seed=0)
    assert (card["counts"]["users"], card["counts"]["items"], card["counts"]["interactions"]) == (
        19_412, 11_924, 167_597)
    assert card["content"]["duplicate_shares"]["content_exact_warm"] == 0.0
    assert card["content"]["duplicate_shares"]["attribute_set_shared"] == pytest.approx(0.88,
                                                                                       abs=0.005)


# --------------------------------------------------------------------------- text content


class WordHashEncoder:
    """A deterministic stand-in for the sentence encoder: a bag of hashed words, 16-d."""

    name = "word-hash-16"

    def __init__(self):
        self.calls = 0

    def encode(self, texts: list[str]) -> np.ndarray:
        import hashlib

        self.calls += 1
        out = np.zeros((len(texts), 16))
        for row, text in enumerate(texts):  # a test double, not a hot path
            for word in text.split():
                out[row, int(hashlib.md5(word.encode()).hexdigest(), 16) % 16] += 1.0
        return out


def _write_texts(root: Path, name: str, attributes: dict, missing: int | None = None) -> None:
    words = ["red", "nail", "polish", "shampoo", "lego", "brush", "gloss", "matte"]
    rows = ["item_id\tasin\ttext"]
    for item, attr in attributes.items():
        if missing is not None and int(item) == missing:
            continue
        text = "" if item == "3" else " ".join(words[(a + k) % len(words)] for k, a in
                                                enumerate(attr))
        rows.append(f"{item}\tB{int(item):09d}\t{text}")
    (root / f"{name}_item_text.tsv").write_text("\n".join(rows) + "\n")


def test_text_content_recipes(fake, tmp_path):
    src, _, attributes = fake
    _write_texts(src, "Beauty", attributes)
    enc = WordHashEncoder()
    cache = tmp_path / "cache"
    card = import_amazon("Beauty", src, tmp_path / "ta", dim=9, content="attributes+text",
                         encoder=enc, cache_dir=cache)
    assert card["content"]["recipe"] == "text+attributes"  # canonical order
    assert card["content"]["layout"].startswith("text part (4) | attributes part (5)")
    assert "Beauty_item_text.tsv" in card["source_files"]
    content = content_matrix(load_dataset(tmp_path / "ta").items)
    assert content.shape[1] == 9
    assert np.allclose(np.linalg.norm(content, axis=1), 1.0, atol=1e-5)
    # the same texts embed once: a second import reads the cache, the same bytes come out
    again = import_amazon("Beauty", src, tmp_path / "ta2", dim=9, content="text+attributes",
                          encoder=enc, cache_dir=cache)
    assert enc.calls == 1 and again["content"] == card["content"]
    assert ((tmp_path / "ta" / "items.parquet").read_bytes()
            == (tmp_path / "ta2" / "items.parquet").read_bytes())
    # text alone: cold items get their text's content, like every other item
    import_amazon("Beauty", src, tmp_path / "t", dim=8, content="text", encoder=enc,
                  cache_dir=cache)
    items = load_dataset(tmp_path / "t").items
    cold = content_matrix(items)[items["is_cold"].to_numpy()]
    assert len(cold) and (np.linalg.norm(cold, axis=1) > 0.99).all()


def test_text_content_errors(fake, tmp_path):
    src, _, attributes = fake
    enc = WordHashEncoder()
    with pytest.raises(ContractError, match=r"Beauty_item_text.tsv: file not found"):
        import_amazon("Beauty", src, tmp_path / "a", content="text", encoder=enc,
                      cache_dir=tmp_path)
    _write_texts(src, "Beauty", attributes, missing=7)
    with pytest.raises(ContractError, match=r"1 item\(s\) of the dataset have no text row, "
                                            r"e.g. \[7\]"):
        import_amazon("Beauty", src, tmp_path / "a", content="text", encoder=enc,
                      cache_dir=tmp_path)
    for recipe, why in (("text+text", "distinct parts"), ("pixels", "distinct parts"),
                        ("cooccurrence", "co-occurrence alone")):
        with pytest.raises(ContractError, match=why):
            import_amazon("Beauty", src, tmp_path / "a", content=recipe, encoder=enc,
                          cache_dir=tmp_path)
    assert not (tmp_path / "a").exists()


def test_text_part_is_a_deterministic_pca():
    from quasid.data.amazon import text_part

    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 6)) @ rng.normal(size=(6, 6))
    part, kept = text_part(x, 3)
    centred = x - x.mean(axis=0)
    u, s, _ = np.linalg.svd(centred, full_matrices=False)
    # the same subspace as numpy's PCA, rows unit norm, the share of variance kept
    proj = u[:, :3] * s[:3]
    ref = proj / np.linalg.norm(proj, axis=1, keepdims=True)
    assert np.allclose(np.abs(part), np.abs(ref), atol=1e-9)
    assert kept == pytest.approx((s[:3] ** 2).sum() / (s**2).sum())
    assert np.array_equal(part, text_part(x.copy(), 3)[0])


def test_the_sentence_encoder_of_the_text_extra(tmp_path):
    """The real encoder (optional extra `text`) on a few texts: unit rows, similar texts
    closer than unrelated ones, and the cache keyed by the texts."""
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("all_minilm_l6_v2")
    from quasid.data.text import SentenceEncoder, embed_texts

    enc = SentenceEncoder(model_dir=tmp_path / "model")
    texts = ["red nail polish", "crimson nail lacquer", "lego ninjago spaceship"]
    emb = embed_texts(texts, enc, tmp_path / "cache")
    assert emb.shape == (3, 384) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.2
    assert np.array_equal(embed_texts(texts, enc, tmp_path / "cache"), emb)
