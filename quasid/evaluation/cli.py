"""The `quasid eval` command: the offline benchmark."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from quasid.core.cli import console, json_option


def eval_cmd(
    data: Path = typer.Option(..., help="Dataset folder (leave-one-out: each user's last item is the test)."),
    tokenizers: str = typer.Option(..., help="Comma-separated tokenizers, e.g. rqvae,quasid,rqvae+hamr; sasrec: the ID-based SASRec baseline; sasrec+transitions: SASRec blended with the transition counts."),
    seeds: int = typer.Option(3, help="Seeds per tokenizer (0..seeds-1): mean and std over them."),
    out: Path = typer.Option(..., help="Output folder: results.json, results.md, runs/."),
    device: str = typer.Option("cpu", help="Torch device (cpu, cuda)."),
    jobs: int = typer.Option(1, help="Runs at once, in separate processes (several fit one GPU)."),
    stack_preset: str = typer.Option("default", help="Stack preset of configs/stacks.yaml (e.g. tiger: TIGER's sizes, early stopping; GPU-sized)."),
    overrides: str = typer.Option("", help='Stack config overrides as JSON, over the preset, e.g. \'{"retriever": {"epochs": 5}}\'.'),
    tokenizer_epochs: int = typer.Option(None, help="Tokenizer training epochs (default: the tokenizer's)."),
    sasrec_overrides: str = typer.Option("", help='SASRec config overrides as JSON, for the "sasrec" tokenizer name (the ID-based baseline), e.g. \'{"d_model": 128}\'.'),
    reuse_only: bool = typer.Option(False, help="Only aggregate runs already finished in OUT."),
) -> None:
    """Offline benchmark: tokenizers x seeds -> SIDs -> stack -> HR@5/10, NDCG@5/10 (all, cold)."""
    from quasid.evaluation.offline import offline_eval
    from quasid.stack.config import stack_preset as preset_overrides

    names = [t.strip() for t in tokenizers.split(",") if t.strip()]
    results = offline_eval(data, names, seeds, out, device=device, jobs=jobs,
                           overrides=preset_overrides(stack_preset, json_option(overrides, "--overrides")),
                           tokenizer_epochs=tokenizer_epochs, reuse_only=reuse_only,
                           sasrec_overrides=json_option(sasrec_overrides, "--sasrec-overrides"))
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


def register(app: typer.Typer) -> None:
    """Add the `eval` command to the console app."""
    app.command("eval")(eval_cmd)
