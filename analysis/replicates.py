"""Training replicates: the uncertainty of an A/B effect from users and from training.

A run whose arms name `replicates: R` serves each arm's users from R stacks trained with R
seeds (`replicate` column of assignments and events, cells split by bucket). Here each
(arm, replicate) cell is aggregated like an arm of its own (`build_store(cells=True)`), each
cell's estimate and users' variance taken the way the row's test takes them (the same
CUPED adjustment in every cell), and `stats.replicate_test` combines them: the effect is
the mean over replicates, its variance comes from the spread of the cells (users and
training together).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from analysis import stats
from analysis.metrics import Cell, Metric, segment_statistics
from analysis.store import StoreInfo, build_store, cell_name, connect
from quasid.core.schemas import REPLICATE_COLUMN


def replicate_counts(info: StoreInfo, threads: int | None = None) -> dict[str, int]:
    """Training replicates per arm, from the assignments (1 each without a replicate column)."""
    with connect(info.db_path, read_only=True, threads=threads) as con:
        columns = {r[0] for r in con.execute("DESCRIBE assignments").fetchall()}
        if REPLICATE_COLUMN not in columns:
            return {arm: 1 for arm in info.manifest.arms}
        found = dict(con.execute(
            f"SELECT arm, max({REPLICATE_COLUMN}) + 1 FROM assignments "
            f"WHERE experiment_id = ? GROUP BY arm", [info.manifest.experiment_id]).fetchall())
    return {arm: int(found.get(arm, 1)) for arm in info.manifest.arms}


def cell_statistics(info: StoreInfo, metrics: list[Metric], threads: int | None = None
                    ) -> dict[tuple[str, str], Cell]:
    """`{(metric, segment): Cell}` whose arms are the (arm, replicate) cells."""
    with tempfile.TemporaryDirectory(prefix="quasid-cells-") as tmp:
        cells_info = build_store(info.run_dir, Path(tmp) / "cells.duckdb", cells=True)
        with connect(cells_info.db_path, threads=threads) as con:
            cells = segment_statistics(con, metrics, cells_info)
    return {(c.metric.name, c.segment): c for c in cells}


def replicate_result(cell: Cell, control: str, arm: str, counts: dict[str, int], method: str,
                     alpha: float) -> stats.ReplicateResult:
    """The replicate-aware test of `arm` vs `control` on one metric and segment, at `alpha`."""
    ratio = cell.metric.is_ratio
    cuped = method.startswith("cuped") and cell.covariate
    k = 2 if ratio else 1
    take = list(range(2 * k)) if cuped else list(range(k))
    names = {a: [cell_name(a, r) for r in range(counts[a])] for a in (control, arm)}
    moments = [cell.arms[c].take(take) for a in (control, arm) for c in names[a]]
    point, var, _ = stats.cell_estimates(moments, ratio, cuped)
    nc = counts[control]
    return stats.replicate_test(point[:nc], var[:nc], point[nc:], var[nc:], alpha=alpha)
