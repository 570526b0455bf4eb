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


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """In the server child: get SIGTERM when the parent dies (Linux prctl PDEATHSIG)."""
    import ctypes
    import signal

    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def start_local_server() -> str | None:
    """Start Prefect's temporary local server now, bound to this process's life.

    Prefect starts it on first use as a plain child process, stopped by `atexit`: a
    SIGKILL (or a SIGTERM, which skips `atexit`) of the parent left it running. Started
    here, from the main thread (the death signal follows the thread that forked), it gets
    `PR_SET_PDEATHSIG` = SIGTERM, so it exits when its parent dies however that happens;
    Prefect then reuses it. Nothing happens when `PREFECT_API_URL` names a server, or off
    Linux. Returns the API URL of the started server (None otherwise).
    """
    import subprocess
    import sys
    import threading

    if os.environ.get("PREFECT_API_URL") or not sys.platform.startswith("linux"):
        return None
    if threading.current_thread() is not threading.main_thread():
        return None
    from prefect.server.api import server as prefect_server
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return None

    class _Popen(subprocess.Popen):
        def __init__(self, *args, **kwargs):
            kwargs.setdefault("preexec_fn", _die_with_parent)
            super().__init__(*args, **kwargs)

    class _Subprocess:
        """`subprocess` as Prefect's server module sees it, with the death signal."""

        Popen = _Popen

        def __getattr__(self, name):
            return getattr(subprocess, name)

    server = prefect_server.SubprocessASGIServer()
    if server.running:
        return server.api_url
    saved = prefect_server.subprocess
    prefect_server.subprocess = _Subprocess()
    try:
        server.start()
    finally:
        prefect_server.subprocess = saved
    return server.api_url


def quiet_tracebacks() -> None:
    """Keep Prefect's console failure logs to their message: no traceback on the console.

    Prefect logs a failing task or flow with its full traceback (tens to hundreds of lines)
    before the error reaches the CLI, which prints it as one line; `--debug` keeps them.
    Prefect re-creates its handlers when a flow starts, so the console handler's class is
    wrapped (idempotent); the API log handler still records the traceback.
    """
    import logging

    from prefect.logging.handlers import PrefectConsoleHandler

    if getattr(PrefectConsoleHandler, "_quasid_quiet", False):
        return
    emit = PrefectConsoleHandler.emit

    def emit_without_traceback(self, record: logging.LogRecord) -> None:
        if record.exc_info or record.exc_text:
            record = logging.makeLogRecord({**record.__dict__, "exc_info": None,
                                            "exc_text": None})
        emit(self, record)

    PrefectConsoleHandler.emit = emit_without_traceback
    PrefectConsoleHandler._quasid_quiet = True
