"""Analysis: DuckDB event store, metrics in SQL, statistics engine, reports.

Entry point: `analysis.analyze.analyze(run_dir, out_dir, ...)` writes every output file at
once; `analysis.engine.analyze_run` computes the same results without writing them. This
package imports only `quasid.core` from the rest of the project.
"""
