"""The `quasid data` commands: make, import and inspect datasets."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from quasid.core.cli import console, fmt

data_app = typer.Typer(no_args_is_help=True, help="Make, import and inspect datasets.")


@data_app.command("synth")
def synth(
    out: Path = typer.Option(..., help="Output folder (items, interactions, world, data card)."),
    seed: int = typer.Option(0, help="Random seed: the same seed gives the same bytes."),
    items: int = typer.Option(5_000, help="Number of items."),
    users: int = typer.Option(20_000, help="Number of users."),
    dim: int = typer.Option(64, help="Content embedding dimension."),
    mean_interactions: float = typer.Option(10.0, help="Mean logged interactions per user."),
    days: int = typer.Option(60, help="Days of logged traffic."),
    cutoff_day: int = typer.Option(45, help="Training cutoff day; new items arrive after it."),
    lookalike_other_leaf: bool = typer.Option(
        True, "--lookalike-other-leaf/--lookalike-same-leaf",
        help="Look-alike partners belong to another leaf (disjoint audiences; the default) or "
             "stay in the anchor's leaf (the worlds before issue 15)."),
) -> None:
    """Generate the built-in synthetic world with its ground truth."""
    from quasid.data.synthetic import WorldConfig, synthesize

    cfg = WorldConfig(n_items=items, n_users=users, content_dim=dim, seed=seed,
                      mean_interactions=mean_interactions, days=days, cutoff_day=cutoff_day,
                      lookalike_other_leaf=lookalike_other_leaf)
    card = synthesize(cfg, out, progress=True)
    console.print(f"wrote {out}: {json.dumps(card['counts'])}")


@data_app.command("import-amazon")
def import_amazon_cmd(
    name: str = typer.Option(..., help="Dataset name, the stem of <name>.txt (e.g. Beauty, "
                                       "Toys_and_Games)."),
    src: Path = typer.Option(..., help="Folder with <name>.txt, <name>_item2attributes.json "
                                       "(and <name>_item_text.tsv for the text content)."),
    out: Path = typer.Option(..., help="Output folder (items, interactions, data card)."),
    seed: int = typer.Option(0, help="Seed of prices, cold cohort, SVDs: same seed, same bytes."),
    dim: int = typer.Option(64, help="Content dimension, split evenly between the parts."),
    content: str = typer.Option("attributes+cooccurrence", help="Content recipe: parts joined "
                                "by '+' among text (sentence embedding of the item text; "
                                "needs the `text` extra), attributes, cooccurrence."),
) -> None:
    """Import an S3-Rec-packaged dataset (e.g. Amazon 5-core): prices and cold cohort simulated."""
    from quasid.core.schemas import ContractError
    from quasid.data.amazon import import_amazon

    try:
        with console.status(f"importing {name}"):
            card = import_amazon(name, src, out, seed=seed, dim=dim, content=content)
    except ContractError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    shares = card["content"]["duplicate_shares"]
    console.print(f"wrote {out}: {json.dumps(card['counts'])}; duplicate content: warm "
                  f"{shares['content_exact_warm']:.2%}, cold {shares['content_exact_cold']:.2%}")


@data_app.command("describe")
def describe_cmd(
    data: Path = typer.Argument(..., help="Dataset folder."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
) -> None:
    """Counts, sparsity, price and category summaries, cohort sizes."""
    from quasid.data.dataset import load_dataset
    from quasid.data.describe import describe

    summary = describe(load_dataset(data))
    if as_json:
        console.print_json(json.dumps(summary))
        return
    table = Table(title=f"{summary['name']} ({data})", show_header=True)
    table.add_column("what")
    table.add_column("value", overflow="fold")
    for key, value in summary.items():
        if key == "name":
            continue
        if isinstance(value, dict):
            value = ", ".join(f"{k}={fmt(v)}" for k, v in value.items())
        table.add_row(key, fmt(value) if not isinstance(value, str) else value)
    console.print(table)


def register(app: typer.Typer) -> None:
    """Add the `data` command group to the console app."""
    app.add_typer(data_app, name="data")
