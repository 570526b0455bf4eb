"""One owner per run folder (`quasid.core.lock`) and the cleanup of a killed run's staging."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from quasid.core.io import remove_stale_staging, staged_dir
from quasid.core.layout import LOCK_FILE
from quasid.core.lock import LockError, acquire, hold, read_owner

ROOT = Path(__file__).resolve().parents[2]


def test_a_second_owner_is_refused_at_once_and_the_lock_is_released(tmp_path):
    with hold(tmp_path / "out", fingerprint="abc", command="test") as lock:
        owner = read_owner(tmp_path / "out")
        assert owner["pid"] == os.getpid() and owner["fingerprint"] == "abc"
        assert owner["host"] == socket.gethostname() and owner["started"].endswith("Z")
        started = time.monotonic()
        with pytest.raises(LockError, match=f"already in use by pid {os.getpid()}"):
            acquire(tmp_path / "out", fingerprint="other")
        assert time.monotonic() - started < 1
        assert lock.took_over is None
    assert not (tmp_path / "out" / LOCK_FILE).exists()
    with hold(tmp_path / "out"):  # free again
        pass


def test_the_lock_is_released_on_an_error(tmp_path):
    with pytest.raises(ZeroDivisionError), hold(tmp_path):
        1 / 0  # noqa: B018
    assert not (tmp_path / LOCK_FILE).exists()


_HOLDER = """
import sys, time
from quasid.core.lock import acquire
acquire(sys.argv[1], fingerprint="dead", command="holder")
print("held", flush=True)
time.sleep(600)
"""


def test_another_process_is_refused_and_its_stale_lock_taken_over_after_sigkill(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(LockError, match=f"pid {proc.pid}"):
            acquire(out)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert read_owner(out)["pid"] == proc.pid  # the dead owner's record is still there
    with hold(out, fingerprint="new") as lock:
        assert lock.took_over["pid"] == proc.pid and lock.took_over["fingerprint"] == "dead"
        assert read_owner(out)["pid"] == os.getpid()


def test_a_record_of_a_dead_pid_without_flock_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": int(dead), "host": socket.gethostname(),
                                                  "started": "x", "fingerprint": "f"}))
    with hold(tmp_path) as lock:
        assert lock.took_over["pid"] == int(dead)


def test_a_lock_of_another_host_is_not_taken_over(tmp_path):
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "elsewhere-42"}))
    with pytest.raises(LockError, match="another host"):
        acquire(tmp_path)


def test_staging_left_by_a_killed_writer_is_removed(tmp_path):
    out = tmp_path / "run"
    (tmp_path / f".{out.name}.abc123.staging" / "plots").mkdir(parents=True)
    (out / "tokenizers" / ".rqvae.x1.staging").mkdir(parents=True)
    (tmp_path / ".other.zz.staging").mkdir()  # another folder's: kept
    removed = remove_stale_staging(out)
    assert len(removed) == 2
    assert not list(out.rglob("*.staging"))
    assert (tmp_path / ".other.zz.staging").exists()
    with staged_dir(out) as tmp:  # staging still works afterwards
        (tmp / "a.txt").write_text("a")
    assert (out / "a.txt").read_text() == "a"
