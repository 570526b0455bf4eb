"""The pipeline's typed parameters: an experiment (the simulator's config) plus how to build it.

A run config is the simulator's experiment YAML with an optional `pipeline:` section
(`configs/default_run.yaml` is the main job's):

    pipeline:
      synthetic: {n_items: 5000, n_users: 20000}   # used when data.path is `synthetic`
      tokenizer_epochs: 20                         # default: each tokenizer's own
      tokenizer_overrides: {}                      # per tokenizer name: nested overrides
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
output folder from `pipeline.synthetic` and the run's seed. Every part is validated when
the file is read (unknown keys, bad values, unknown tokenizers, stack settings and world
settings are errors naming the field), before anything is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from quasid.core.config import CONFIGS_DIR, Config, load_yaml, parse
from quasid.data.synthetic import WorldConfig
from quasid.stack.config import stack_config
from quasid.tokenizer.config import tokenizer_config
from simulator.config import ExperimentConfig

SYNTHETIC = "synthetic"
DEFAULT_CONFIG = CONFIGS_DIR / "default_run.yaml"


class PipelineOptions(Config):
    """How the pipeline builds what the experiment needs."""

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

    @model_validator(mode="after")
    def _builds(self) -> PipelineOptions:
        # the settings of what the pipeline will build, checked now rather than after
        # minutes of training
        WorldConfig(**self.synthetic)
        stack_config(self.stack_overrides)
        for name, overrides in self.tokenizer_overrides.items():
            tokenizer_config(name, overrides)
        return self


class RunConfig(Config):
    """Everything `ab_pipeline` needs: where to write, seed, device, the experiment."""

    out: Path
    seed: int = 0
    device: str = "cpu"
    pipeline: PipelineOptions = PipelineOptions()
    experiment: ExperimentConfig

    @model_validator(mode="after")
    def _tokenizers_known(self) -> RunConfig:
        for tokenizer in self.tokenizers.values():
            tokenizer_config(tokenizer)
        return self

    def experiment_config(self, data_path: Path | None = None,
                          stacks: dict[str, list[str]] | None = None) -> ExperimentConfig:
        """The simulator's config with the run's seed, data folder, serving device and built
        stacks (per arm, one per training replicate) filled in."""
        raw = self.experiment.model_dump(mode="json")
        raw["seed"] = self.seed
        raw["serving_device"] = self.device
        if data_path is not None:
            raw["data"]["path"] = str(data_path)
        for arm in raw["arms"]:
            built = (stacks or {}).get(arm["name"])
            built = [built] if isinstance(built, str) else built
            if built:
                arm["stack"] = built[0] if len(built) == 1 else list(built)
        return parse(ExperimentConfig, raw, f"{self.out}/run config")

    def fingerprint(self) -> str:
        """sha256 of the run's settings (all but `out`): the owner record of its folder."""
        import hashlib
        import json

        raw = self.model_dump(mode="json", exclude={"out"})
        return hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()

    @property
    def tokenizers(self) -> dict[str, str]:
        """`{arm name: tokenizer}` for the arms the pipeline builds a SID stack for."""
        return {a.name: a.tokenizer for a in self.experiment.arms if a.tokenizer and not a.stack}

    @property
    def trainings(self) -> dict[str, list[tuple[str, int]]]:
        """`{arm name: [(tokenizer, training seed) per replicate]}` for the arms the pipeline
        builds; replicate r trains with `ArmSpec.training_seeds` (the run's seed + r)."""
        return {a.name: [(a.tokenizer, s) for s in a.training_seeds(self.seed)]
                for a in self.experiment.arms if a.tokenizer and not a.stack}


def load_run_config(path: Path | None, out: Path, seed: int, device: str) -> RunConfig:
    """Read a run config YAML (default: `configs/default_run.yaml`) and validate all of it."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    raw = load_yaml(path)
    pipeline = raw.pop("pipeline", None) or {}
    return parse(RunConfig, {"out": out, "seed": seed, "device": device, "pipeline": pipeline,
                             "experiment": raw}, str(path))

