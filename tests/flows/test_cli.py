"""Issue 19 on `quasid run` and the root CLI, as a user runs them (subprocesses).

Quick: -h / --version, one-line errors with exit code 2, every check before any write, a
held --out refused at once. Slow (a Prefect server each): SIGINT stops a run within
seconds with exit 130, and neither SIGINT nor SIGKILL leaves Prefect's server behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
TINY_WORLD = dict(n_items=300, n_users=1_500, content_dim=16, taste_dim=8, mean_interactions=8.0)


def _quasid(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def _config(tmp_path: Path, name: str = "run", **changes) -> Path:
    """A run config with popularity vs random arms on a tiny synthetic world."""
    raw = {"pipeline": {"synthetic": TINY_WORLD, "n_shards": 2},
           "experiment_id": "cli", "data": {"path": "synthetic"},
           "arms": [{"name": "control", "stack": "popularity", "allocation": 0.5},
                    {"name": "treatment", "stack": "random", "allocation": 0.5}],
           "days": 10, "pre_days": 3, "slate_size": 10}
    raw.update(changes)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines
    assert "Traceback" not in result.stderr + result.stdout
    return lines[0]


def test_help_alias_and_version():
    from importlib.metadata import version

    assert _quasid("-h").returncode == 0 and "run" in _quasid("-h").stdout
    assert "--out" in _quasid("run", "-h").stdout
    result = _quasid("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"quasid {version('quasid-ab')}"


@pytest.mark.parametrize("case, message", [
    ("stack", "arms[0] (control): stack: 'no-such-stack'"),
    ("slate", "slate_size: 60 exceeds the synthetic world's 50 positions"),
    ("tokenizer", "unknown tokenizer 'no-such-tokenizer'"),
    ("users", "n_users: 0 (expected >= 10)"),
    ("data", "data.path"),
    ("device", "--device: cuda"),
])
def test_run_checks_everything_before_any_write(tmp_path, case, message):
    arms = [{"name": "control", "stack": "popularity", "allocation": 0.5},
            {"name": "treatment", "stack": "random", "allocation": 0.5}]
    changes = {
        "stack": {"arms": [dict(arms[0], stack="no-such-stack"), arms[1]]},
        "slate": {"slate_size": 60},
        "tokenizer": {"arms": [arms[0], {"name": "treatment", "tokenizer": "no-such-tokenizer",
                                         "allocation": 0.5}]},
        "users": {"pipeline": {"synthetic": dict(TINY_WORLD, n_users=0)}},
        "data": {"data": {"path": str(tmp_path / "missing")}, "world": {"kind": "fitted"}},
        "device": {},
    }[case]
    args = ["run", "--config", str(_config(tmp_path, **changes)), "--out", str(tmp_path / "out")]
    if case == "device":
        import torch

        if torch.cuda.is_available():
            pytest.skip("CUDA is available here")
        args += ["--device", "cuda"]
    result = _quasid(*args)
    assert result.returncode == 2, result.stderr
    assert message in _one_error_line(result)
    assert not (tmp_path / "out").exists()  # not even the folder


def test_bad_input_of_other_commands_is_one_line_with_exit_2(tmp_path):
    for args in (["data", "describe", str(tmp_path / "nope")],
                 ["train", "--data", str(tmp_path / "nope"), "--tokenizer", "rqvae",
                  "--out", str(tmp_path / "tok")],
                 ["analyze", str(tmp_path / "nope"), "--out", str(tmp_path / "report")],
                 ["run", "--config", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "o")]):
        result = _quasid(*args)
        assert result.returncode == 2, (args, result.stderr)
        _one_error_line(result)
    debug = _quasid("--debug", "data", "describe", str(tmp_path / "nope"))
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_run_into_a_held_folder_stops_at_once(tmp_path):
    from quasid.core.lock import hold

    out = tmp_path / "out"
    with hold(out, command="another quasid run"):
        started = time.monotonic()
        result = _quasid("run", "--config", str(_config(tmp_path)), "--out", str(out))
        elapsed = time.monotonic() - started
    assert result.returncode == 2
    assert f"already in use by pid {os.getpid()}" in _one_error_line(result)
    assert elapsed < 30 and os.listdir(out) == []


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _server_of(pid: int) -> int | None:
    for kid in _children(pid):
        try:
            if b"prefect.server.api.server" in Path(f"/proc/{kid}/cmdline").read_bytes():
                return kid
        except OSError:
            pass
    return None


def _gone(pid: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state == "Z":
            return True
        time.sleep(0.2)
    return False


def _start_run(tmp_path: Path, **changes) -> tuple[subprocess.Popen, Path]:
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", "--config",
                             str(_config(tmp_path, **changes)), "--out", str(out)], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    return proc, out


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_sigint_stops_a_run_within_seconds_and_no_server_remains(tmp_path):
    # small batches over many days: minutes of simulation unless stopped
    proc, out = _start_run(tmp_path, batch_size=5, days=15)
    deadline = time.monotonic() + 300
    while not list(out.glob("run/events/*/*/*.parquet")) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.2)
    server = _server_of(proc.pid)
    assert server is not None
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    rc = proc.wait(timeout=120)
    latency = time.monotonic() - sent
    err = proc.stderr.read()
    assert latency < 15, latency
    assert not list(out.glob("run/_simulator/shards/*.json"))  # stopped, not run to the end
    assert rc == 130, err
    assert "error: interrupted" in err.strip().splitlines()[-1]
    assert _gone(server, within=15)
    assert not list(out.rglob("*.tmp")) and not (out / ".quasid.lock").exists()
    print(f"quasid run: SIGINT to exit {latency:.2f} s")


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_sigkill_of_a_run_leaves_no_prefect_server(tmp_path):
    proc, out = _start_run(tmp_path, batch_size=5, days=15)
    deadline = time.monotonic() + 300
    server = None
    while server is None and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        server = _server_of(proc.pid)
        time.sleep(0.2)
    assert server is not None
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert _gone(server, within=15)
    # the next run takes the dead run's lock over and finishes
    result = _quasid("run", "--config", str(_config(tmp_path)), "--out", str(out), timeout=400)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (out / "report.md").exists()


def test_local_server_is_left_to_prefect_when_a_url_is_set_or_prefect_is_imported(monkeypatch):
    from flows import runtime

    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:1/api")
    assert runtime.start_local_server() is None  # the user's server
    monkeypatch.delenv("PREFECT_API_URL")
    monkeypatch.setitem(sys.modules, "prefect", sys.modules.get("prefect", object()))
    assert runtime.start_local_server() is None  # settings already read: Prefect's own
    assert "PREFECT_API_URL" not in os.environ


def test_waiting_on_a_local_server_that_dies_or_never_answers_raises_at_once():
    from flows.runtime import LocalServer, _free_port

    url = f"http://127.0.0.1:{_free_port()}/api"  # nothing listens there
    dead = LocalServer(subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"]), url)
    with pytest.raises(RuntimeError, match="exited with code 3"):
        dead.wait(timeout=30)
    silent = LocalServer(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"]), url)
    try:
        start = time.monotonic()
        with pytest.raises(RuntimeError, match="did not answer within"):
            silent.wait(timeout=0.5)
        assert time.monotonic() - start < 10
    finally:
        silent.stop()
    assert silent.process.poll() is not None  # stopped
