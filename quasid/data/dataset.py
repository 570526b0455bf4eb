"""A dataset folder: `items.parquet`, `interactions.parquet`, `datacard.json` (and, for the
synthetic world, `world.npz`). Reading validates every file; writing validates everything
first and stages the files, so a failure leaves the folder as it was.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from quasid.core.io import staged_dir, write_text_atomic
from quasid.core.layout import DATACARD_FILE, INTERACTIONS_FILE, ITEMS_FILE, WORLD_FILE
from quasid.core.schemas import (
    INTERACTIONS,
    ITEMS,
    ContractError,
    read_parquet,
    validate,
    validate_references,
    write_parquet,
)
from quasid.data.world import World


@dataclass
class Dataset:
    """Items and logged interactions of one dataset, validated, plus its card and true world."""

    root: Path
    items: pl.DataFrame
    interactions: pl.DataFrame
    datacard: dict
    world: World | None = None

    @property
    def name(self) -> str:
        """The dataset's name from its card (e.g. `synthetic`, `Beauty`)."""
        return str(self.datacard.get("name", self.root.name))

    @property
    def cutoff_ts(self) -> int | None:
        """End of the training window (None when the source has no global time)."""
        value = self.datacard.get("cutoff_ts")
        return None if value is None else int(value)

    def content(self) -> np.ndarray:
        """Content embeddings as a float32 matrix, row k = `items[k]`."""
        return content_matrix(self.items)


def content_matrix(items: pl.DataFrame) -> np.ndarray:
    """The `content` list column as an (n_items, dim) float32 array."""
    if items.height == 0:
        return np.zeros((0, 0), dtype=np.float32)
    dim = int(items["content"].list.len()[0])
    return items["content"].list.to_array(dim).to_numpy().astype(np.float32, copy=False)


def validate_dataset(items: pl.DataFrame, interactions: pl.DataFrame, root: Path) -> None:
    """Validate both tables and that every interaction names a known item."""
    validate(items, ITEMS, source=str(root / ITEMS_FILE))
    validate(interactions, INTERACTIONS, source=str(root / INTERACTIONS_FILE))
    validate_references(interactions, "item_id", items["item_id"], f"{root / ITEMS_FILE}",
                        source=str(root / INTERACTIONS_FILE))


def load_dataset(root: str | Path) -> Dataset:
    """Read and validate a dataset folder; errors name the file, column and rows."""
    root = Path(root)
    if not root.is_dir():
        raise ContractError(f"{root}: not a dataset folder (expected {ITEMS_FILE}, "
                            f"{INTERACTIONS_FILE} and {DATACARD_FILE})")
    items = read_parquet(root / ITEMS_FILE, ITEMS)
    interactions = read_parquet(root / INTERACTIONS_FILE, INTERACTIONS)
    validate_dataset(items, interactions, root)
    card_path = root / DATACARD_FILE
    datacard = json.loads(card_path.read_text()) if card_path.exists() else {}
    world_path = root / WORLD_FILE
    world = World.load(world_path) if world_path.exists() else None
    return Dataset(root, items, interactions, datacard, world)


def write_dataset(
    out: str | Path,
    items: pl.DataFrame,
    interactions: pl.DataFrame,
    datacard: dict,
    world: World | None = None,
) -> Path:
    """Validate, then write the dataset's files together (all or nothing)."""
    out = Path(out)
    validate_dataset(items, interactions, out)
    with staged_dir(out) as tmp:
        write_parquet(items.sort("item_id"), tmp / ITEMS_FILE, ITEMS)
        write_parquet(interactions, tmp / INTERACTIONS_FILE, INTERACTIONS)
        if world is not None:
            world.save(tmp / WORLD_FILE)
        write_text_atomic(json.dumps(datacard, indent=2, sort_keys=True) + "\n",
                          tmp / DATACARD_FILE)
    return out


def counts(items: pl.DataFrame, interactions: pl.DataFrame) -> dict:
    """Basic counts for a data card."""
    return {
        "users": int(interactions["user_id"].n_unique()),
        "items": int(items.height),
        "interactions": int(interactions.height),
        "cold_items": int(items["is_cold"].sum()),
    }
