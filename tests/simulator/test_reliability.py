"""Issue 19 on the simulator: a corrected config restarts an unfinished run; `quasid
simulate` checks before writing, refuses a held folder, and stops on SIGINT within seconds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from simulator.replay import run_shard
from simulator.rundir import RunDirError, prepare

ROOT = Path(__file__).resolve().parents[2]


def _quasid(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_a_corrected_config_restarts_an_unfinished_run(base_config, tmp_path):
    out = tmp_path / "run"
    prepare(base_config, out, n_shards=2)  # then the run failed before any shard finished
    corrected = dict(base_config, slate_size=5)
    plan = prepare(corrected, out, n_shards=2)
    assert json.loads((out / "_simulator" / "plan.json").read_text()) == plan
    run_shard(corrected, 0, 2, out)
    # once a shard of a plan finished, another config is refused (events would mix)
    with pytest.raises(RunDirError, match="of which shards finished"):
        prepare(base_config, out, n_shards=2)


def test_simulate_checks_everything_before_the_first_write(base_config, tmp_path):
    cases = {
        "slate": (dict(base_config, slate_size=60), "slate_size: 60 exceeds the synthetic "
                                                    "world's 50 positions"),
        "stack": (dict(base_config, arms=[dict(base_config["arms"][0], stack="no/such/stack"),
                                          base_config["arms"][1]]), "arms[0] (control): stack"),
        "data": (dict(base_config, data={"path": str(tmp_path / "nodata")}), "data.path"),
    }
    for name, (config, message) in cases.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        result = _quasid("simulate", "--config", str(path), "--out", str(tmp_path / name))
        assert result.returncode == 2, (name, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
        assert not (tmp_path / name).exists(), name


def test_simulate_into_a_held_folder_stops_at_once(base_config, tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(base_config))
    from quasid.core.lock import hold

    out = tmp_path / "run"
    with hold(out, command="the first owner"):
        started = time.monotonic()
        result = _quasid("simulate", "--config", str(path), "--out", str(out))
        elapsed = time.monotonic() - started
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"already in use by pid {os.getpid()}" in lines[0], lines
    assert sorted(p.name for p in out.iterdir()) == []  # nothing written, lock released
    assert elapsed < 30


def test_sigint_stops_the_simulation_within_seconds(base_config, tmp_path):
    # many small batches over many days: minutes of work when not stopped
    config = dict(base_config, batch_size=10, days=14, pre_days=5)
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "simulate", "--config",
                             str(path), "--out", str(out)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(out.glob("events/*/*/*.parquet")) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, proc.stderr.read()
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    rc = proc.wait(timeout=60)
    latency = time.monotonic() - sent
    err = proc.stderr.read()
    assert rc == 130, err
    assert latency < 5, latency
    assert err.strip().splitlines()[-1].startswith("error: interrupted"), err
    assert not list(out.rglob("*.tmp")) and not (out / "manifest.json").exists()
    assert not (out / ".quasid.lock").exists()
    print(f"SIGINT stop latency {latency:.2f} s")
