"""Analysis: DuckDB event store, metrics in SQL, statistics engine, reports.

Entry point: `analysis.analyze.analyze(run_dir, out_dir, ...)` writes every output file at
once; `analysis.engine.analyze_run` computes the same results without writing them;
`analysis.logs.import_logs` turns external event logs into a run directory;
`analysis.ope.estimate_run` gives off-policy estimates from logged propensities. This
package imports only `quasid.core` from the rest of the project.
"""
