"""Helpers shared by every package's commands: one console, number formatting, JSON options."""

from __future__ import annotations

import json

import typer
from rich.console import Console

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
