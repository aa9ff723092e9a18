"""The ``embpress`` command: parses arguments, calls the library, prints. No logic lives here."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Compressed embedding tables and corpus vectors, with an honest benchmark.")
console = Console(stderr=True, soft_wrap=True)

QUICK_DATASET = "synthetic:rows=200000"
DEFAULT_DATASET = "synthetic"


def _fail(msg: str) -> None:
    console.print(f"[red]error:[/red] {msg}")
    raise typer.Exit(2)


@app.command()
def bench(
    dataset: Annotated[list[str] | None, typer.Option(
        "--dataset", "-d", help="Dataset spec, repeatable: synthetic, criteo:PATH, avazu:PATH, "
        "movielens:DIR, libfm:PATH[,PATH...].")] = None,
    model: Annotated[str, typer.Option(help="Model head(s), comma-separated: dlrm, dcn, wdl, deepfm.")] = "dlrm",
    methods: Annotated[str | None, typer.Option(help="Comma-separated table methods, or 'all'.")] = None,
    ratios: Annotated[str | None, typer.Option(help="Comma-separated compression ratios, e.g. 10,100.")] = None,
    seeds: Annotated[str | None, typer.Option(help="Comma-separated seeds.")] = None,
    epochs: Annotated[int | None, typer.Option(
        help="Epochs per stage (early stopping on validation AUC); default by dataset: 1 for synthetic, "
        "criteo and avazu, 30 for libfm and movielens.")] = None,
    dim: Annotated[int, typer.Option(help="Embedding dimension.")] = 16,
    batch_size: Annotated[int, typer.Option(help="Training batch size.")] = 2048,
    lr: Annotated[float, typer.Option(help="Learning rate (Adam and SparseAdam).")] = 3e-3,
    out: Annotated[Path, typer.Option(help="Run folder: results.jsonl, report.md, pareto.png.")] = Path("runs/bench"),
    quick: Annotated[bool, typer.Option("--quick", help="Same grid, smaller: one seed, 200k synthetic rows.")] = False,
    threads: Annotated[int | None, typer.Option(help="torch threads (default: torch's choice).")] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Run methods x ratios x seeds on datasets, append records, then write report.md and pareto.png."""
    from embpress.bench.ctr import (
        DEFAULT_METHODS,
        DEFAULT_RATIOS,
        BenchConfig,
        parse_list,
        resolve_methods,
        run_bench,
    )
    from embpress.bench.report import write_report
    from embpress.data.registry import load_dataset

    try:
        cfg = BenchConfig(
            datasets=tuple(dataset) if dataset else ((QUICK_DATASET,) if quick else (DEFAULT_DATASET,)),
            models=parse_list(model, str, "model"),
            methods=resolve_methods(parse_list(methods, str, "methods") or DEFAULT_METHODS),
            ratios=parse_list(ratios, float, "ratios") or DEFAULT_RATIOS,
            seeds=parse_list(seeds, int, "seeds") or ((0,) if quick else (0, 1, 2)),
            epochs=epochs, dim=dim, batch_size=batch_size, lr=lr, threads=threads, progress=progress,
        )
    except ValueError as e:
        _fail(str(e))
    from embpress.models import registered_models

    for m in cfg.models:
        if m not in registered_models():
            _fail(f"unknown model {m!r}; available: {registered_models()}")

    def load(spec: str):
        console.print(f"loading {spec} ...")
        return load_dataset(spec, progress=progress)

    try:
        outcome = run_bench(cfg, out, load=load, log=console.print)
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    md, png = write_report(out)
    console.print(f"{outcome.ran} trials run, {outcome.skipped} already recorded; wrote {md} and {png}")
    if outcome.failed:
        console.print(f"[red]{len(outcome.failed)} trial(s) failed:[/red]")
        for f in outcome.failed:
            console.print(f"  {f}")
        raise typer.Exit(1)


@app.command()
def report(out: Annotated[Path, typer.Argument(help="Run folder holding results.jsonl.")]) -> None:
    """Re-render report.md and pareto.png from the records of a run folder."""
    from embpress.bench.report import write_report

    try:
        md, png = write_report(out)
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))
    console.print(f"wrote {md} and {png}")


def _mount_subcommands() -> None:
    from embpress.vectors.cli import app as vectors_app

    app.add_typer(vectors_app, name="vectors", help="Compress, search and evaluate corpus vectors.")


_mount_subcommands()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
