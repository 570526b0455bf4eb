"""Analysis: DuckDB event store, metrics in SQL, statistics engine, reports.

Public entry point: `analysis.analyze(run_dir, out_dir, *, alpha=0.05, control=None,
db_path=None, ...) -> dict` (the results: `{"rows": [...], "srm": {...}}`); it is imported
lazily so that importing the package (the CLI does) stays cheap.
"""

from __future__ import annotations

from typing import Any

__all__ = ["analyze"]


def __getattr__(name: str) -> Any:
    if name == "analyze":
        from analysis.analyze import analyze

        return analyze
    raise AttributeError(f"module 'analysis' has no attribute {name!r}")
