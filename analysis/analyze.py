"""`analyze`: one analysis of a run, every output file written at once.

`analysis.engine.analyze_run` computes the results; this module writes `results.json`,
`details.json`, `report.md`, `report.html`, the plots and the DuckDB views file through one
staging folder, so a failed analysis leaves the output folder as it was.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from analysis.engine import AnalysisConfig, analyze_run
from analysis.report import write_report
from analysis.store import AnalysisError
from quasid.core.io import staged_dir
from quasid.core.layout import DB_NAME

# The analysis state kept beside the outputs: the sequential looks' τ², fixed at the first
# analysis of a run from its planned horizon and reused by every re-analysis into the same
# folder (delete it to start the looks over).
STATE_FILE = "analysis_state.json"


def analyze(run_dir: Path, out_dir: Path, *, alpha: float = 0.05, control: str | None = None,
            db_path: Path | None = None, correction: str = "bh",
            metrics: list[str] | None = None, bootstrap: int = 0, power: float = 0.8,
            target_uplift: float = 0.02, seed: int = 0, threads: int | None = 1,
            plots: bool = True, progress: Callable[[str], None] | None = None,
            metrics_file: str | Path | None = None,
            primary: list[str] | None = None) -> dict:
    """Analyse `run_dir` and write the report to `out_dir`; returns the results dict.

    Writes `results.json` ({"rows", "srm"}), `details.json`, `report.md`, a self-contained
    `report.html`, `plots/*.png`, `analysis_state.json` (the sequential τ², read back by the
    next analysis into `out_dir`) and (unless `db_path` says elsewhere) the DuckDB views file
    `events.duckdb`, all at once through a staging folder: bad input raises `AnalysisError`
    and leaves `out_dir` as it was. `threads=1` (the default) sums in one fixed order, so a
    re-analysis gives byte-identical files; more threads (or None: DuckDB's default) may
    change sums in their last bits. `metrics_file`: a YAML metrics file (default: the
    registry, `configs/metrics/default.yaml`); `primary`: metric names forming the primary
    family.
    """
    config = AnalysisConfig(alpha=alpha, control=control, correction=correction,
                            metrics=tuple(metrics) if metrics is not None else None,
                            bootstrap=bootstrap, power=power, target_uplift=target_uplift,
                            seed=seed, threads=threads,
                            metrics_file=str(metrics_file) if metrics_file is not None else None,
                            primary=tuple(primary) if primary else None)
    out_dir = Path(out_dir)
    state_file = out_dir / STATE_FILE
    state = None
    if state_file.exists():
        try:
            state = json.loads(state_file.read_text())
        except json.JSONDecodeError as exc:
            raise AnalysisError(f"{state_file}: not valid JSON ({exc}); delete it to start the "
                                f"sequential looks over") from exc
    with staged_dir(out_dir) as tmp:
        db = Path(db_path) if db_path is not None else tmp / DB_NAME
        analysis = analyze_run(run_dir, db, config, progress, state)
        # the run folder as seen from the output folder: both can move together
        analysis.details["run_dir"] = os.path.relpath(Path(run_dir).resolve(),
                                                      out_dir.resolve())
        if progress:
            progress("writing the report")
        (tmp / "results.json").write_text(json.dumps(analysis.results, indent=2))
        (tmp / "details.json").write_text(json.dumps(analysis.details, indent=2))
        (tmp / STATE_FILE).write_text(json.dumps(analysis.state, indent=2))
        write_report(analysis, tmp, plots=plots)
    return analysis.results
