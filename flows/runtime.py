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


class LocalServer:
    """Prefect's temporary local server, started by `start_local_server` (the handle to wait on)."""

    def __init__(self, process, api_url: str):
        self.process, self.api_url = process, api_url

    def wait(self, timeout: float | None = None) -> str:
        """Block until the server answers its health check; returns the API URL.

        Raises `RuntimeError` when the server exits first or `timeout` seconds pass
        (default: `PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS`).
        """
        import time
        import urllib.error
        import urllib.request

        limit = float(timeout if timeout is not None else
                      os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", 180))
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Prefect's local server exited with code {self.process.returncode} "
                                   f"before answering (expected it to serve {self.api_url})")
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as response:
                    if response.status == 200:
                        return self.api_url
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.1)
        raise RuntimeError(f"Prefect's local server did not answer within {limit:.0f} s "
                           f"({self.api_url}/health)")

    def stop(self) -> None:
        """Terminate the server (at exit; a second call does nothing)."""
        import subprocess

        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_local_server() -> LocalServer | None:
    """Start Prefect's temporary local server now, bound to this process's life; don't wait.

    Prefect would start the same server (uvicorn on `prefect.server.api.server:create_app`,
    UI off) on first use, from inside the flow call, and wait for it: its imports and
    database set-up took ~10 s of the main job on a 2-core box, with the main process
    idle, after ~5 s of importing the server's modules in the main process only to launch
    it. Started here, the main process points `PREFECT_API_URL` at it (Prefect then never
    imports its server modules) and goes on with its own imports and checks while the
    server starts; `LocalServer.wait()` before the first flow call.

    The child gets `PR_SET_PDEATHSIG` = SIGTERM (call from the main thread: the death
    signal follows the thread that forked), so it exits when its parent dies however that
    happens (a SIGKILL skips `atexit`), and an `atexit` handler stops it on a normal exit.
    Nothing happens (None) when `PREFECT_API_URL` already names a server, off Linux, off
    the main thread, or once `prefect` is imported (call it first).
    """
    import atexit
    import subprocess
    import sys
    import threading

    if os.environ.get("PREFECT_API_URL") or not sys.platform.startswith("linux"):
        return None
    if threading.current_thread() is not threading.main_thread():
        return None
    if "prefect" in sys.modules:  # its settings are read: Prefect starts its own server on first use
        return None
    from importlib.util import find_spec

    # where prefect is installed, without importing it: its settings must see PREFECT_API_URL
    site = Path(find_spec("prefect").submodule_search_locations[0]).parent
    port = _free_port()
    env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
           "PREFECT__SERVER_FINAL": "1"}
    # the same command line as Prefect's own SubprocessASGIServer
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--app-dir", str(site),
         "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1",
         "--port", str(port), "--log-level", "error", "--lifespan", "on"],
        env=env, preexec_fn=_die_with_parent)
    server = LocalServer(process, f"http://127.0.0.1:{port}/api")
    atexit.register(server.stop)
    os.environ["PREFECT_API_URL"] = server.api_url
    return server


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
