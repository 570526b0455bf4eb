"""The `quasid` console command: every step of the harness under one CLI.

The model-only commands live in `quasid.cli` (they run on a bare GPU machine); this module
adds the commands of the packages that know the rest of the stack. Heavy imports (Prefect,
DuckDB) happen inside each command, so `quasid --help` stays fast.
"""

from __future__ import annotations

from analysis.cli import analyze_cmd
from quasid.cli import app
from simulator.cli import register as register_simulate

app.command("analyze")(analyze_cmd)
register_simulate(app)


def main() -> None:
    """Entry point of the `quasid` console script."""
    app()


if __name__ == "__main__":
    main()
