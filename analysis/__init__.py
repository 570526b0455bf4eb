"""Analysis: DuckDB event store, metrics in SQL, statistics engine, reports."""
