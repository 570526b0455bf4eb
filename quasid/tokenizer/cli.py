"""The `quasid train` command: one tokenizer on a dataset folder."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from quasid.core.cli import console, fmt, json_option


def train_cmd(
    data: Path = typer.Option(..., help="Dataset folder (items, interactions, data card)."),
    tokenizer: str = typer.Option(..., help="rqvae, rqkmeans, quasid, adasid, uniform, rqvae+hamr, adasid+hamr."),
    out: Path = typer.Option(..., help="Output folder: sids.parquet, tokenizer.pt/json, metrics.json, training.png."),
    device: str = typer.Option("cpu", help="Torch device (cpu, cuda)."),
    epochs: int = typer.Option(None, help="Training epochs (default: the tokenizer's)."),
    seed: int = typer.Option(0, help="Random seed: the same seed gives the same SIDs on the CPU."),
    overrides: str = typer.Option("", help='Tokenizer config overrides as JSON, e.g. \'{"hamr_weight": 2}\'.'),
) -> None:
    """Train a SID tokenizer, assign SIDs to every item and report SID quality."""
    from quasid.tokenizer.train import train_tokenizer

    metrics = train_tokenizer(data, tokenizer, out, device=device, epochs=epochs, seed=seed,
                              overrides=json_option(overrides, "--overrides"))
    table = Table(title=f"{tokenizer} on {data}")
    table.add_column("metric")
    table.add_column("value")
    for key in ("collision_rate", "unique_sids", "sid_entropy", "codebook_utilization",
                "harmful_collision_rate", "benign_collision_rate", "train_seconds"):
        if key in metrics:
            table.add_row(key, fmt(metrics[key]))
    console.print(table)
    console.print(f"wrote {out}")


def register(app: typer.Typer) -> None:
    """Add the `train` command to the console app."""
    app.command("train")(train_cmd)
