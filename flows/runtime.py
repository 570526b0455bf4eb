"""Prefect settings that must be in place before `prefect` is imported.

With no `PREFECT_API_URL`, Prefect starts a temporary local server per process. It needs a
writable home of its own (not `~/.prefect`, shared with other tools), no telemetry (this
machine is offline and the errors would fill the log) and a generous start-up timeout on a
busy 2-core machine. Settings the user has already exported win.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_HOME = Path.home() / ".cache" / "quasid" / "prefect"


def configure_prefect(home: Path | None = None, log_level: str = "WARNING") -> Path:
    """Set Prefect's environment defaults (idempotent); returns the Prefect home in use.

    `log_level`: Prefect's logging level unless the environment sets one (the main job
    asks for INFO: its stages' progress lines).
    """
    os.environ.setdefault("PREFECT_HOME", str(home or DEFAULT_HOME))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_RESULTS_PERSIST_BY_DEFAULT", "true")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", log_level)
    home_path = Path(os.environ["PREFECT_HOME"])
    home_path.mkdir(parents=True, exist_ok=True)
    return home_path
