"""The pipeline's typed parameters: an experiment (the simulator's YAML) plus how to build it.

A run config is the simulator's experiment YAML with an optional `pipeline:` section:

    pipeline:
      synthetic: {n_items: 5000, n_users: 20000}   # used when data.path is `synthetic`
      tokenizer_epochs: 20                         # default: each tokenizer's own
      tokenizer_overrides: {}                      # per tokenizer name: overrides dict
      stack_overrides: {retriever: {epochs: 4}}    # applied to every SID stack
      alpha: 0.05
      n_shards: 2
    experiment_id: quasid_vs_rqvae
    data: {path: synthetic}
    arms:
      - {name: control, tokenizer: rqvae, allocation: 0.5}
      - {name: treatment, tokenizer: quasid, allocation: 0.5}
    ...

`data.path: synthetic` means "the built-in synthetic world", generated into the run's
output folder from `pipeline.synthetic` and the run's seed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from simulator.config import ExperimentConfig, parse_config

SYNTHETIC = "synthetic"
DEFAULT_CONFIG = Path(__file__).with_name("default_run.yaml")


class PipelineOptions(BaseModel):
    """How the pipeline builds what the experiment needs."""

    model_config = ConfigDict(extra="forbid")

    synthetic: dict[str, Any] = Field(default_factory=dict,
                                      description="WorldConfig fields for data.path: synthetic.")
    tokenizer_epochs: int | None = Field(None, ge=1)
    tokenizer_overrides: dict[str, dict[str, Any]] = Field(default_factory=dict)
    stack_overrides: dict[str, Any] = Field(default_factory=dict)
    alpha: float = Field(0.05, gt=0, lt=1)
    target_uplift: float = Field(0.02, gt=0)
    analysis_threads: int | None = Field(
        1, ge=1, description="DuckDB threads for the analysis; 1 makes results.json "
                             "byte-identical across reruns (parallel float sums vary in the "
                             "last bits); None = all cores, for large runs.")
    metrics: list[str] | None = Field(None, description="Metrics to analyse (default: all "
                                                         "registered metrics).")
    n_shards: int = Field(2, ge=1)
    task_runner: Literal["threads", "dask"] = "threads"
    dask_address: str | None = Field(None, description="Existing Dask scheduler; default: a "
                                                       "local cluster of `dask_workers`.")
    dask_workers: int = Field(2, ge=1)


class RunConfig(BaseModel):
    """Everything `ab_pipeline` needs: where to write, seed, device, the experiment."""

    model_config = ConfigDict(extra="forbid")

    out: Path
    seed: int = 0
    device: str = "cpu"
    pipeline: PipelineOptions = PipelineOptions()
    experiment: dict[str, Any]

    def experiment_config(self, data_path: Path | None = None,
                          stacks: dict[str, str] | None = None) -> ExperimentConfig:
        """The simulator's config with the run's seed, data folder and built stacks filled in."""
        raw = dict(self.experiment)
        raw["seed"] = self.seed
        if data_path is not None:
            raw["data"] = {**raw.get("data", {}), "path": str(data_path)}
        if stacks:
            raw["arms"] = [{**arm, "stack": stacks.get(arm["name"], arm.get("stack"))}
                           for arm in raw["arms"]]
        return parse_config(raw, source=f"{self.out}/run config")

    @property
    def tokenizers(self) -> dict[str, str]:
        """`{arm name: tokenizer}` for the arms the pipeline builds a SID stack for."""
        return {a["name"]: a["tokenizer"] for a in self.experiment["arms"]
                if a.get("tokenizer") and not a.get("stack")}


def load_run_config(path: Path | None, out: Path, seed: int, device: str) -> RunConfig:
    """Read a run config YAML (default: the packaged QuaSID vs RQ-VAE run) and validate it."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    if not path.exists():
        raise FileNotFoundError(f"{path}: run config not found")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    pipeline = raw.pop("pipeline", {}) or {}
    config = RunConfig(out=out, seed=seed, device=device,
                       pipeline=PipelineOptions(**pipeline), experiment=raw)
    # validate the experiment part now (with a stand-in for stacks the pipeline builds)
    stand_in = {name: "random" for name in config.tokenizers}
    config.experiment_config(data_path=Path("."), stacks=stand_in)
    return config
