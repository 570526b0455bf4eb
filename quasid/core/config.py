"""The one config idiom: frozen pydantic models with `extra="forbid"`, one override merge.

Every setting of the project (world, import, tokenizer, stack, experiment, run) is a
`Config` subclass: typed, validated on construction, unknown keys refused. `merge` applies
a nested overrides mapping (`{"retriever": {"epochs": 5}, "candidates": 40}`) to a config
and validates the result; `load_yaml` reads a preset or run file from `configs/`. Errors
are `ConfigError`s that name the source, the field path and the bad value.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

C = TypeVar("C", bound="Config")
CONFIGS_DIR = Path(__file__).resolve().parents[2] / "configs"
"""The repository's `configs/` folder: presets and run configs as YAML."""


class ConfigError(ValueError):
    """A config that cannot be used: names the source, the field and the value."""


class Config(BaseModel):
    """Base of every config: immutable, typed, unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def describe_errors(exc: ValidationError) -> str:
    """A pydantic error as `field.path: message (got value)`, one clause per problem."""
    problems = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "<top>"
        value = err.get("input")
        shown = "" if isinstance(value, Mapping) else f" (got {value!r})"
        problems.append(f"{where}: {re.sub(r'^Value error, ', '', err['msg'])}{shown}")
    return "; ".join(problems)


def parse(model: type[C], raw: object, source: str) -> C:
    """Validate `raw` (a mapping, or an instance returned as is) as `model`; `ConfigError`
    names `source` and every bad field."""
    if isinstance(raw, model):
        return raw
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: expected a mapping at the top level, got "
                          f"{type(raw).__name__}")
    try:
        return model.model_validate(dict(raw))
    except ValidationError as exc:
        raise ConfigError(f"{source}: invalid {model.__name__}: {describe_errors(exc)}") from None


def merge(config: C, overrides: Mapping[str, Any] | None, where: str = "overrides") -> C:
    """`config` with nested `overrides` applied, validated again.

    A mapping given for a field that is itself a config is merged into it key by key;
    anything else replaces the field. Unknown keys raise `ConfigError` naming the path and
    the known keys, e.g. "overrides.retriever: unknown key 'layers' (expected one of ...)".
    """
    if not overrides:
        return config
    fields = type(config).model_fields
    data = config.model_dump()
    for key, value in overrides.items():
        if key not in fields:
            raise ConfigError(f"{where}: unknown key '{key}' (expected one of {sorted(fields)})")
        current = getattr(config, key)
        if isinstance(current, Config) and isinstance(value, Mapping):
            value = merge(current, value, f"{where}.{key}").model_dump()
        data[key] = value
    try:
        return type(config).model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{where}: {describe_errors(exc)}") from None


def nested_update(base: Mapping[str, Any], new: Mapping[str, Any]) -> dict:
    """Overrides `new` laid over overrides `base` (plain dicts, nested ones merged key by key):
    how a preset and a user's overrides combine before `merge` validates them."""
    out = dict(base)
    for key, value in new.items():
        both = isinstance(value, Mapping) and isinstance(out.get(key), Mapping)
        out[key] = nested_update(out[key], value) if both else value
    return out


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping; `ConfigError` for a missing file, bad YAML or a non-mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    return raw
