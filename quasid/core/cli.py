"""Helpers shared by every package's commands: one console, number formatting, JSON options."""

from __future__ import annotations

import json

import typer
from rich.console import Console

from quasid.core.lock import LockError

console = Console()


def fmt(value: object) -> str:
    """A value for a table cell: floats to 4 significant digits."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def json_option(text: str, option: str) -> dict | None:
    """Parse a JSON-object option (e.g. `--overrides`); empty means None; bad JSON exits 2."""
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        typer.echo(f"error: {option}: not valid JSON ({exc.msg} at column {exc.colno}); "
                   f"expected an object such as '{{\"epochs\": 5}}'", err=True)
        raise typer.Exit(2) from None
    if not isinstance(value, dict):
        typer.echo(f"error: {option}: expected a JSON object, got {type(value).__name__}", err=True)
        raise typer.Exit(2)
    return value


# ---------------------------------------------------------------- one error style

INPUT_ERRORS: list[type[BaseException]] = [ValueError, FileNotFoundError, NotADirectoryError,
                                           IsADirectoryError, LockError]
"""Errors that mean bad input (exit code 2, one line). `ValueError` covers `ConfigError`,
`ContractError`, `AnalysisError`, `StatsError`, `CohortError` and pydantic's
`ValidationError`; other packages add theirs with `register_input_error`."""


def register_input_error(cls: type[BaseException]) -> type[BaseException]:
    """Count `cls` as bad input in every command (usable as a class decorator)."""
    if cls not in INPUT_ERRORS:
        INPUT_ERRORS.append(cls)
    return cls


def is_input_error(exc: BaseException) -> bool:
    """Bad input: a registered class, or a DuckDB I/O or input error (a corrupt file)."""
    if isinstance(exc, tuple(INPUT_ERRORS)):
        return True
    module = type(exc).__module__ or ""
    return module.startswith("duckdb") and type(exc).__name__ in (
        "IOException", "InvalidInputException", "ConversionException", "CatalogException")


def one_line(exc: BaseException) -> str:
    """`<file/field>: <what> (expected <what>)` on one line, as the project's errors read."""
    try:
        from pydantic import ValidationError
    except ImportError:  # pragma: no cover
        ValidationError = ()  # noqa: N806
    if isinstance(exc, ValidationError):
        from quasid.core.config import describe_errors

        text = describe_errors(exc).replace("<top>: ", "")
        if not text.startswith(exc.title):
            text = f"{exc.title}: {text}"
    elif isinstance(exc, OSError) and exc.filename and exc.strerror:
        text = f"{exc.filename}: {(exc.strerror or str(exc)).lower()}"
        if isinstance(exc, FileNotFoundError):
            text += " (expected an existing file or folder)"
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


def error_line(exc: BaseException) -> str:
    """The line printed on stderr for an error."""
    return f"error: {one_line(exc)}"
