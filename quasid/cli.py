"""The `quasid` commands that need only the model package: data, train, eval.

The full console command (`flows.cli`) adds simulate, analyze, run and serve on top; this
app alone runs on a bare GPU machine (`python -m quasid.cli ...`).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="QuaSID A/B harness: data, tokenizers, SID stacks, simulated A/B tests.")
data_app = typer.Typer(no_args_is_help=True, help="Make, import and inspect datasets.")
app.add_typer(data_app, name="data")
console = Console()


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
) -> None:
    """Generate the built-in synthetic world with its ground truth."""
    from quasid.data.synthetic import WorldConfig, synthesize

    cfg = WorldConfig(n_items=items, n_users=users, content_dim=dim, seed=seed,
                      mean_interactions=mean_interactions, days=days, cutoff_day=cutoff_day)
    card = synthesize(cfg, out, progress=True)
    console.print(f"wrote {out}: {json.dumps(card['counts'])}")


@data_app.command("import-amazon")
def import_amazon_cmd(
    name: str = typer.Option(..., help="Dataset: Beauty or Toys_and_Games."),
    src: Path = typer.Option(..., help="Folder with <name>.txt and <name>_item2attributes.json."),
    out: Path = typer.Option(..., help="Output folder (items, interactions, data card)."),
    seed: int = typer.Option(0, help="Seed of prices, cold cohort, SVDs: same seed, same bytes."),
    dim: int = typer.Option(64, help="Content dimension (half attribute, half collaborative)."),
) -> None:
    """Import an Amazon 5-core dataset (S3-Rec format): prices and cold cohort simulated."""
    from quasid.core.schemas import ContractError
    from quasid.data.amazon import import_amazon

    try:
        with console.status(f"importing {name}"):
            card = import_amazon(name, src, out, seed=seed, dim=dim)
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
            value = ", ".join(f"{k}={_fmt(v)}" for k, v in value.items())
        table.add_row(key, _fmt(value) if not isinstance(value, str) else value)
    console.print(table)


@app.command("train")
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
                              overrides=json.loads(overrides) if overrides else None)
    table = Table(title=f"{tokenizer} on {data}")
    table.add_column("metric")
    table.add_column("value")
    for key in ("collision_rate", "unique_sids", "sid_entropy", "codebook_utilization",
                "harmful_collision_rate", "benign_collision_rate", "train_seconds"):
        if key in metrics:
            table.add_row(key, _fmt(metrics[key]))
    console.print(table)
    console.print(f"wrote {out}")


@app.command("eval")
def eval_cmd(
    data: Path = typer.Option(..., help="Dataset folder (leave-one-out: each user's last item is the test)."),
    tokenizers: str = typer.Option(..., help="Comma-separated tokenizers, e.g. rqvae,quasid,rqvae+hamr."),
    seeds: int = typer.Option(3, help="Seeds per tokenizer (0..seeds-1): mean and std over them."),
    out: Path = typer.Option(..., help="Output folder: results.json, results.md, runs/."),
    device: str = typer.Option("cpu", help="Torch device (cpu, cuda)."),
    jobs: int = typer.Option(1, help="Runs at once, in separate processes (several fit one GPU)."),
    overrides: str = typer.Option("", help='Stack config overrides as JSON, e.g. \'{"retriever": {"epochs": 5}}\'.'),
    tokenizer_epochs: int = typer.Option(None, help="Tokenizer training epochs (default: the tokenizer's)."),
    reuse_only: bool = typer.Option(False, help="Only aggregate runs already finished in OUT."),
) -> None:
    """Offline benchmark: tokenizers x seeds -> SIDs -> stack -> HR@5/10, NDCG@5/10 (all, cold)."""
    from quasid.evaluation.offline import offline_eval

    names = [t.strip() for t in tokenizers.split(",") if t.strip()]
    results = offline_eval(data, names, seeds, out, device=device, jobs=jobs,
                           overrides=json.loads(overrides) if overrides else None,
                           tokenizer_epochs=tokenizer_epochs, reuse_only=reuse_only)
    table = Table(title=f"{data}: stack, mean over {seeds} seed(s)")
    for col in ("tokenizer", "segment", "hr@5", "hr@10", "ndcg@5", "ndcg@10"):
        table.add_column(col)
    for row in results["rows"]:
        table.add_row(row["tokenizer"], row["segment"],
                      *(f"{row[m]:.4f}±{row[m + '_std']:.4f}" for m in ("hr@5", "hr@10", "ndcg@5", "ndcg@10")))
    console.print(table)
    if results["failed"]:
        console.print(f"failed runs: {results['failed']}")
    console.print(f"wrote {out / 'results.json'} and {out / 'results.md'}")


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def config_dict(obj: object) -> dict:
    """A dataclass config as a JSON-ready dict."""
    return json.loads(json.dumps(asdict(obj), default=str))


if __name__ == "__main__":
    app()
