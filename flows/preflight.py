"""The run's preflight: every check `quasid run` needs, before Prefect starts or a file is
written.

`load_run_config` already validated the file (unknown keys, tokenizer names and their
overrides, stack overrides, the synthetic world's settings, the experiment's own rules);
`preflight(config)` adds what needs the machine or the disk:
- the device: `cpu`, or `cuda[:N]` with CUDA available (and N < the device count);
- the data: for `data.path: synthetic` the world that will be generated (its items and
  `max_positions`), otherwise the dataset folder and its files;
- the experiment against that data (`simulator.preflight.check_experiment`): slate size vs
  items and the world's positions, each arm's stack (tokenizer arms are built here);
- the output: `--out` is a folder (or absent), not a file.
Errors are `PreflightError`s (exit code 2), one line each.
"""

from __future__ import annotations

from pathlib import Path

from flows.config import SYNTHETIC, RunConfig
from quasid.data.synthetic import WorldConfig
from quasid.data.world import DAY_SECONDS
from simulator.preflight import DataShape, PreflightError, check_experiment


def check_device(device: str) -> None:
    """`cpu` or an available CUDA device."""
    if device == "cpu":
        return
    kind, _, index = device.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise PreflightError(f"--device: {device!r} is not a device (expected cpu, cuda or "
                             "cuda:N)")
    import torch

    if not torch.cuda.is_available():
        raise PreflightError(f"--device: {device} asked for but CUDA is not available on this "
                             "machine (expected --device cpu here, or a CUDA build of torch "
                             "on a GPU machine)")
    if index and int(index) >= torch.cuda.device_count():
        raise PreflightError(f"--device: {device}: this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s) (expected an index "
                             f"below {torch.cuda.device_count()})")


def preflight(config: RunConfig, source: str = "run config") -> None:
    """Raise `PreflightError` for the first problem the run would meet; writes nothing."""
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise PreflightError(f"--out: {out} is a file (expected a folder, new or of an "
                             "earlier run)")
    check_device(config.device)
    experiment = config.experiment
    planned = None
    if str(experiment.data.path) == SYNTHETIC:
        world = WorldConfig(**config.pipeline.synthetic)
        planned = DataShape(world.n_items, world.max_positions,
                            world.cutoff_day * DAY_SECONDS, world.days * DAY_SECONDS)
    check_experiment(experiment, planned=planned, built_arms=set(config.tokenizers),
                     source=source)
