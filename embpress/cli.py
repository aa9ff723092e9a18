"""The ``embpress`` command: parses arguments, checks them, calls the library, prints. No logic lives here.

Bad input (options, files, run folders, records) is refused before any work with one line on
stderr, ``error: ...`` naming the value and the fix, and exit status 2; never a traceback.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Compressed embedding tables and corpus vectors, with an honest benchmark.")
vectors_app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                          help="Compress corpus vectors, search the codes, and benchmark recall against bytes.")
app.add_typer(vectors_app, name="vectors", help="Compress, search and evaluate corpus vectors.")
limit_app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                        help="The LIMIT capacity probe and LIMIT-style retrieval data.")
app.add_typer(limit_app, name="limit", help="LIMIT: critical n per dimension, and LIMIT-style data.")
console = Console(stderr=True, soft_wrap=True)
_out = Console(soft_wrap=True)

QUICK_DATASET = "synthetic:rows=200000"
DEFAULT_DATASET = "synthetic"
BAD_INPUT = (ValueError, TypeError, OSError, ImportError)
"""What bad input raises in the library (RecordError, CacheError and BudgetError are ValueErrors;
missing files, folders and an unreachable network are OSErrors): exit status 2, one line."""


def _fail(msg: str) -> NoReturn:
    """Print ``error: msg`` on one line (no markup, no wrapping) and exit with status 2."""
    console.print("error: " + " ".join(str(msg).split()), markup=False, highlight=False)
    raise typer.Exit(2)


def _positive(value: int | float | None, option: str, *, allow_zero: bool = False) -> None:
    if value is None:
        return
    low = 0 if allow_zero else 1
    if isinstance(value, float):
        ok = value == value and value != float("inf") and value >= low
    else:
        ok = value >= low
    if not ok:
        _fail(f"{option} must be >= {low}, got {value}")


def _check_out(out: Path, kind: str) -> None:
    from embpress.bench.records import open_run

    try:
        open_run(out, kind)
    except BAD_INPUT as e:
        _fail(str(e))


def _guard(fn: Callable[[], object]) -> object:
    """Run ``fn``; bad input becomes one line and exit status 2."""
    try:
        return fn()
    except BAD_INPUT as e:
        _fail(str(e) or type(e).__name__)


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
    sparse_opt: Annotated[str, typer.Option(help="Optimizer of the embedding rows: adam (lazy Adam) or "
                                            "rowwise_adagrad (one accumulator a row, TorchRec's default).")] = "adam",
    sparse_lr: Annotated[float | None, typer.Option(help="Learning rate of the embedding rows (default: --lr; "
                                                    "row-wise AdaGrad wants more, e.g. 0.01-0.05).")] = None,
    out: Annotated[Path, typer.Option(help="Run folder: results.jsonl, report.md, pareto.png.")] = Path("runs/bench"),
    quick: Annotated[bool, typer.Option("--quick", help="Same grid, smaller: one seed, 200k synthetic rows.")] = False,
    threads: Annotated[int | None, typer.Option(help="torch threads (default: torch's choice).")] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    executor: Annotated[str, typer.Option(help="Where trials run: serial (this process) or ray (one Ray task "
                                          "per trial; pip install 'embpress[ray]').")] = "serial",
    address: Annotated[str | None, typer.Option(help="With --executor ray: a running Ray cluster's address "
                                                "('auto': the one this machine belongs to); default: start "
                                                "a local Ray on this machine.")] = None,
    cpus_per_trial: Annotated[int | None, typer.Option(help="With --executor ray: CPUs per trial's task, which "
                                                       "are its torch threads (default: --threads, else 1).")] = None,
    tune: Annotated[int | None, typer.Option(help="Before each compressed method and ratio runs its seeds, search "
                                             "its learning rates and declared hyper-parameters with this many "
                                             "Ray Tune trials (ASHA, validation AUC); needs embpress[ray].")] = None,
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
    from embpress.data.registry import check_spec, load_dataset

    if executor not in ("serial", "ray"):
        _fail(f"--executor must be serial or ray, got {executor!r}")
    if executor == "serial" and (address is not None or cpus_per_trial is not None):
        _fail("--address and --cpus-per-trial apply to --executor ray; add --executor ray or leave them out")
    _positive(cpus_per_trial, "--cpus-per-trial")
    if threads is not None and threads < 1:  # before --executor ray puts its default in its place
        _fail(f"--threads must be an int >= 1, got {threads}")
    _positive(tune, "--tune")
    if tune is not None:
        from embpress.bench.ray_executor import import_ray as _ray

        _guard(_ray)
    if executor == "ray":
        if cpus_per_trial is not None and threads is not None and cpus_per_trial != threads:
            _fail(f"--threads {threads} differs from --cpus-per-trial {cpus_per_trial}: on Ray a trial's torch "
                  "threads are its task's CPUs; give one of them")
        threads = threads or cpus_per_trial or 1
        from embpress.bench.ray_executor import RayExecutor, import_ray

        _guard(import_ray)
        run_on = RayExecutor(address=address, cpus_per_trial=threads)
    else:
        run_on = None

    def config() -> BenchConfig:
        datasets = tuple(dataset) if dataset else ((QUICK_DATASET,) if quick else (DEFAULT_DATASET,))
        for spec in datasets:
            check_spec(spec)  # format, options and files, before any loading
        return BenchConfig(
            datasets=datasets,
            models=parse_list(model, str, "model"),
            methods=resolve_methods(parse_list(methods, str, "methods") or DEFAULT_METHODS),
            ratios=parse_list(ratios, float, "ratios") or DEFAULT_RATIOS,
            seeds=parse_list(seeds, int, "seeds") or ((0,) if quick else (0, 1, 2)),
            epochs=epochs, dim=dim, batch_size=batch_size, lr=lr, threads=threads, progress=progress, tune=tune,
            sparse_optimizer=sparse_opt, sparse_lr=sparse_lr,
        )

    cfg = _guard(config)
    _check_out(out, "ctr")

    def load(spec: str):
        console.print(f"loading {spec} ...", markup=False)
        return load_dataset(spec, progress=progress)

    outcome = _guard(lambda: run_bench(cfg, out, load=load, log=lambda m: console.print(m, markup=False),
                                       executor=run_on))
    md, png = _guard(lambda: write_report(out))
    console.print(f"{outcome.ran} trials run, {outcome.skipped} already recorded; wrote {md} and {png}", markup=False)
    if outcome.failed:
        console.print(f"{len(outcome.failed)} trial(s) failed:", markup=False)
        for f in outcome.failed:
            console.print(f"  {f}", markup=False)
        raise typer.Exit(1)


@app.command()
def train(
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="Dataset spec (as for bench).")] = DEFAULT_DATASET,
    model: Annotated[str, typer.Option(help="Model head: dlrm, dcn, wdl, deepfm.")] = "dlrm",
    method: Annotated[str, typer.Option(help="Table method.")] = "hash",
    ratio: Annotated[float, typer.Option(help="Compression ratio (ignored by the references full and noid).")] = 10.0,
    dim: Annotated[int, typer.Option(help="Embedding dimension.")] = 16,
    epochs: Annotated[int, typer.Option(help="Epochs per stage.")] = 1,
    batch_size: Annotated[int, typer.Option(help="Global batch size (split over torchrun's processes).")] = 2048,
    lr: Annotated[float, typer.Option(help="Learning rate (Adam and row-sparse Adam).")] = 3e-3,
    sparse_opt: Annotated[str, typer.Option(help="Optimizer of the embedding rows: adam or rowwise_adagrad.")] = "adam",
    sparse_lr: Annotated[float | None, typer.Option(help="Learning rate of the embedding rows (default: --lr).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the table, the model and the batch order.")] = 0,
    threads: Annotated[int | None, typer.Option(help="torch threads per process.")] = None,
    checkpoint: Annotated[Path | None, typer.Option(help="Write the trained model here (rank 0).")] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars (rank 0).")] = True,
) -> None:
    """Train one model and print its metrics as JSON; under `torchrun --nproc-per-node N` the processes
    train one replicated model data-parallel (gloo), each on its slice of every batch."""
    import json

    import torch

    from embpress.bench.ctr import _is_reference
    from embpress.data.registry import check_spec, load_dataset
    from embpress.distributed import init_from_env
    from embpress.models import build_model
    from embpress.tables import Ratio, build_table
    from embpress.train import TrainConfig, Trainer, save_checkpoint

    for value, option in ((dim, "--dim"), (epochs, "--epochs"), (batch_size, "--batch-size"), (threads, "--threads")):
        _positive(value, option)
    _positive(ratio, "--ratio")
    _guard(lambda: check_spec(dataset))
    dp = _guard(init_from_env)
    rank = 0 if dp is None else dp.rank
    if threads:
        torch.set_num_threads(threads)
    data = _guard(lambda: load_dataset(dataset, progress=progress and rank == 0))
    torch.manual_seed(seed)
    reference = _guard(lambda: _is_reference(method))
    table = _guard(lambda: build_table(method, fields=data.fields, dim=dim, budget=None if reference else Ratio(ratio)))
    net = _guard(lambda: build_model(model, table=table, num_dense=data.num_dense))
    cfg = _guard(lambda: TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr,
                                     sparse_lr=lr if sparse_lr is None else sparse_lr, seed=seed,
                                     progress=progress and rank == 0, sparse_optimizer=sparse_opt))
    result = Trainer(net, data, cfg).fit()
    if rank == 0:
        if checkpoint is not None:
            save_checkpoint(checkpoint, net, method=method, ratio=ratio, seed=seed)
        _out.print(json.dumps({"method": method, "ratio": None if reference else ratio, "seed": seed,
                               "processes": 1 if dp is None else dp.world_size,
                               "valid_auc": result.valid_auc, "test_auc": result.test_auc,
                               "test_logloss": result.test_logloss,
                               "train_samples_per_s": result.train_samples_per_s,
                               "train_seconds": result.train_seconds}), markup=False, highlight=False)


@app.command()
def report(out: Annotated[Path, typer.Argument(help="Run folder holding results.jsonl.")]) -> None:
    """Re-render report.md and its figure from the records of a run folder (CTR, vectors or LIMIT probe)."""
    from embpress.bench.records import RESULTS, run_kind

    def render():
        if out.exists() and not out.is_dir():
            raise NotADirectoryError(f"{out} is a file, not a run folder (a folder holding {RESULTS})")
        if not (out / RESULTS).is_file():
            raise FileNotFoundError(f"{out / RESULTS} not found: run `embpress bench`, `embpress vectors eval` or "
                                    f"`embpress limit probe` with `--out {out}` first")
        kind = run_kind(out)
        if kind == "vectors":
            from embpress.bench.vectors_report import render_report
            return render_report(out)
        if kind == "limit":
            from embpress.bench.limit import write_report as limit_report
            return limit_report(out)
        from embpress.bench.report import write_report
        return write_report(out)  # CTR, or the error for an empty run folder

    md, png = _guard(render)
    console.print(f"wrote {md} and {png}", markup=False)


@vectors_app.command("eval")
def vectors_eval(
    codecs: str = typer.Option(..., "--codecs", help="Comma-separated codec specs, e.g. 'fp16,sq8,pq48,pca128+sq8'."),
    out: Path = typer.Option(..., "--out", help="Run folder: results.jsonl, report.md, pareto.png."),
    base: Path | None = typer.Option(None, "--base", help="Corpus vectors (.npy, .fvecs)."),
    queries: Path | None = typer.Option(None, "--queries", help="Query vectors; default: hold out --n-queries of the base."),
    n_queries: int = typer.Option(1000, "--n-queries", help="Queries held out of the base when --queries is absent."),
    train_size: int | None = typer.Option(None, "--train-size",
                                          help="Fit codecs (ours and FAISS) on this many random base vectors."),
    beir: Path | None = typer.Option(None, "--beir", help="A BEIR/MTEB folder (corpus.jsonl, queries.jsonl, qrels)."),
    model: str | None = typer.Option(None, "--model", help="sentence-transformers model name or path (with --beir)."),
    split: str = typer.Option("test", "--split", help="qrels split (with --beir)."),
    cache: Path | None = typer.Option(None, "--cache", help="Embedding cache folder (default ~/.cache/embpress)."),
    metrics_backend: str = typer.Option("ranx", "--metrics-backend", help="nDCG/recall@100 via 'ranx' or 'numpy'."),
    encode_threads: int | None = typer.Option(None, "--encode-threads", help="torch threads while encoding text."),
    k: int = typer.Option(10, "--k", help="recall@k cut-off."),
    oversample: int = typer.Option(4, "--oversample", help="Re-rank the top k*oversample candidates exactly."),
    metric: str = typer.Option("ip", "--metric", help="ip, cosine or l2."),
    seed: int = typer.Option(0, "--seed"),
    threads: int = typer.Option(1, "--threads", help="Threads for search, ours and FAISS alike."),
    faiss: bool = typer.Option(True, "--faiss/--no-faiss", help="Measure the FAISS equivalents."),
    qps_time: float = typer.Option(0.5, "--qps-time", help="Seconds of repeated searches per queries/s figure."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    multivector: str | None = typer.Option(
        None, "--multivector", help="MUVERA over the model's token states, e.g. 'fde:R=20,k=5,dproj=8' (with "
        "--beir): single vector, exact Chamfer, and FDE through each --codecs codec + Chamfer re-rank."),
    candidates: str = typer.Option("10,20,50,100", "--candidates", help="FDE candidates re-ranked (--multivector)."),
    carve_tau: float | None = typer.Option(None, "--carve-tau",
                                           help="Ball-carve query tokens at this similarity (--multivector)."),
) -> None:
    """Benchmark codecs on vectors (--base) or on a BEIR folder encoded with a text model (--beir)."""
    from embpress.bench.ctr import parse_list
    from embpress.bench.vectors import REFERENCE, EvalSet, holdout_queries, run_eval, sample_rows
    from embpress.bench.vectors_report import render_report
    from embpress.vectors.codec import build_codec
    from embpress.vectors.metric import as_metric

    for value, option in ((n_queries, "--n-queries"), (train_size, "--train-size"), (k, "--k"),
                          (oversample, "--oversample"), (threads, "--threads"), (encode_threads, "--encode-threads")):
        _positive(value, option)
    _positive(qps_time, "--qps-time", allow_zero=True)
    if metrics_backend not in ("ranx", "numpy"):
        _fail(f"--metrics-backend must be 'ranx' or 'numpy', got {metrics_backend!r}")
    if (base is None) == (beir is None):
        _fail("give exactly one of --base (vectors) or --beir (a BEIR folder)")
    if beir is None and (model is not None or cache is not None):
        _fail("--model and --cache apply to --beir only; drop them with --base")
    if queries is not None and base is not None and queries.resolve() == base.resolve():
        _fail(f"--queries {queries} is the --base file: every query would find itself; omit --queries to hold "
              "out --n-queries of the base, or give another file")
    for path, option in ((base, "--base"), (queries, "--queries")):
        if path is not None and not path.is_file():
            _fail(f"{option} {path}: file not found" + (" (it is a folder)" if path.is_dir() else ""))
    if beir is not None and not beir.is_dir():
        _fail(f"--beir {beir}: folder not found")
    specs = _guard(lambda: parse_list(codecs, str, "codecs"))

    def check_specs() -> None:
        as_metric(metric)
        for s in specs:
            if s != REFERENCE:
                build_codec(s)  # syntax check before loading or encoding anything

    _guard(check_specs)
    if multivector is not None:
        if beir is None:
            _fail("--multivector needs --beir (token states come from encoding the texts)")
        cands = _guard(lambda: parse_list(candidates, int, "candidates"))
        if any(c < k for c in cands):
            _fail(f"--candidates must all be >= --k {k}, got {candidates!r}")
        _guard(lambda: _multivector_eval(beir, model, split, cache, encode_threads, multivector, specs, cands, k,
                                         seed, threads, carve_tau, out, progress))
        return
    _check_out(out, "vectors")

    def load() -> EvalSet:
        if beir is not None:
            from embpress.vectors.beir import load_beir
            from embpress.vectors.encode import default_model_path, encode_texts, model_label

            ds = load_beir(beir, split=split)
            model_name = model or default_model_path()
            _out.print(f"{ds.name}: {len(ds.corpus_ids):,} documents, {len(ds.query_ids):,} judged queries",
                       markup=False)
            xq = encode_texts(ds.query_texts, model=model_name, cache_dir=cache, num_threads=encode_threads,
                              progress=progress, description="queries")
            xb = encode_texts(ds.corpus_texts, model=model_name, cache_dir=cache, num_threads=encode_threads,
                              progress=progress, description="corpus")
            data = EvalSet(f"{ds.name}:{model_label(model_name)}", xb, xq, corpus_ids=ds.corpus_ids,
                           query_ids=ds.query_ids, qrels=ds.qrels, metrics_backend=metrics_backend)
        else:
            from embpress.vectors.vecio import read_vectors

            xb = read_vectors(base)
            if queries is not None:
                xq = read_vectors(queries)
            else:
                if n_queries > xb.shape[0] // 2:
                    raise ValueError(f"--n-queries {n_queries} is more than half of the {xb.shape[0]} vectors of "
                                     f"--base {base} (the rest is the corpus); give --n-queries <= "
                                     f"{xb.shape[0] // 2} or a --queries file")
                xb, xq = holdout_queries(xb, n_queries, seed=seed)
            data = EvalSet(base.stem, xb, xq)
        if train_size is not None:
            data = dataclasses.replace(data, train=sample_rows(data.base, train_size, seed=seed))
        return data

    data = _guard(load)
    _guard(lambda: run_eval(data, specs, out, k=k, oversample=oversample, metric=metric, seed=seed, threads=threads,
                            with_faiss=faiss, qps_time=qps_time, progress=progress,
                            log=lambda m: _out.print(m, markup=False)))
    md, png = _guard(lambda: render_report(out))
    _out.print(f"wrote {out / 'results.jsonl'}, {md}, {png}", markup=False)



def _multivector_eval(beir: Path, model: str | None, split: str, cache: Path | None, encode_threads: int | None,
                      spec: str, codecs: list[str], candidates: tuple[int, ...], k: int, seed: int, threads: int,
                      carve_tau: float | None, out: Path, progress: bool) -> None:
    """The --multivector branch of ``vectors eval``: records in ``out/results.jsonl``, then the report."""
    from threadpoolctl import threadpool_limits

    from embpress.bench.multivector import run_multivector_eval
    from embpress.bench.vectors_report import render_report
    from embpress.vectors.beir import load_beir
    from embpress.vectors.encode import default_model_path, encode_texts, encode_token_states, model_label
    from embpress.vectors.multivector import parse_fde_spec

    parse_fde_spec(spec)
    _check_out(out, "vectors")
    ds = load_beir(beir, split=split)
    model_name = model or default_model_path()
    _out.print(f"{ds.name}: {len(ds.corpus_ids):,} documents, {len(ds.query_ids):,} judged queries", markup=False)
    enc = {"model": model_name, "cache_dir": cache, "num_threads": encode_threads, "progress": progress}
    # Token states first: their forward passes also fill the single-vector cache (one pass, not two).
    tq = encode_token_states(ds.query_texts, description="query tokens", **enc)
    tb = encode_token_states(ds.corpus_texts, description="corpus tokens", **enc)
    xq = encode_texts(ds.query_texts, description="queries", **enc)
    xb = encode_texts(ds.corpus_texts, description="corpus", **enc)
    with threadpool_limits(threads):
        run_multivector_eval(out=out, dataset=ds.name, model=model_label(model_name), corpus_ids=ds.corpus_ids,
                             query_ids=ds.query_ids, qrels=ds.qrels, doc_vectors=xb, query_vectors=xq,
                             doc_tokens=tb, query_tokens=tq, encoder=spec, codecs=codecs, candidates=candidates,
                             k=k, seed=seed, carve_tau=carve_tau, threads=threads,
                             log=lambda m: _out.print(m, markup=False))
    md, png = render_report(out)
    _out.print(f"wrote {out / 'results.jsonl'}, {md}, {png}", markup=False)


@vectors_app.command("build")
def vectors_build(
    base: Path = typer.Option(..., "--base", help="Corpus vectors (.npy, or raw .f32 with --dim); may exceed RAM."),
    index: str = typer.Option(..., "--index", help="Index spec, e.g. 'ivf4096,pq32', 'ivf1024,sq8', 'sq8'."),
    out: Path = typer.Option(..., "--out", help="Index folder to write."),
    rerank: bool = typer.Option(False, "--rerank/--no-rerank", help="Keep float32 originals for exact re-ranking."),
    metric: str = typer.Option("ip", "--metric", help="ip, cosine or l2."),
    train_size: int = typer.Option(100_000, "--train-size", help="Random rows the codec (and k-means) train on."),
    nprobe: int = typer.Option(1, "--nprobe", help="Default lists scanned per query (IVF)."),
    dim: int | None = typer.Option(None, "--dim", help="Dimension of a raw .f32 base file."),
    block_size: int = typer.Option(1 << 16, "--block-size", help="Rows encoded at once."),
    threads: int | None = typer.Option(None, "--threads", help="Threads (FAISS, numba, BLAS)."),
    seed: int = typer.Option(0, "--seed"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Build an index folder from a vector file, streaming it block by block."""
    from embpress.vectors.build import build_index
    from embpress.vectors.index import Index
    from embpress.vectors.kernels import limit_threads
    from embpress.vectors.metric import as_metric
    from embpress.vectors.vecio import VectorFile

    for value, option in ((train_size, "--train-size"), (nprobe, "--nprobe"), (dim, "--dim"),
                          (block_size, "--block-size"), (threads, "--threads")):
        _positive(value, option)
    _guard(lambda: (as_metric(metric), Index(index, nprobe=nprobe), VectorFile(base, d=dim)))
    if out.exists() and not out.is_dir():
        _fail(f"--out {out} is a file; give a folder for the index")

    def run():
        with limit_threads(threads):
            return build_index(base, index, out, metric=metric, train_size=train_size, rerank=rerank,
                               nprobe=nprobe, seed=seed, block_size=block_size, d=dim, progress=progress)

    idx, t = _guard(run)
    _out.print(f"{out}: {idx!r}; {idx.bytes_per_vector()} B/vector in RAM, fit {t['fit_s']:.1f} s, "
               f"encode {t['vectors_per_s']:,.0f} vectors/s", markup=False)


@vectors_app.command("search")
def vectors_search(
    index_dir: Path = typer.Argument(..., help="An index folder written by `embpress vectors build`."),
    queries: Path = typer.Option(..., "--queries", help="Query vectors (.npy, .fvecs)."),
    k: int = typer.Option(10, "--k"),
    nprobe: int | None = typer.Option(None, "--nprobe", help="Lists scanned per query (IVF)."),
    oversample: int = typer.Option(1, "--oversample", help="Re-rank k*oversample candidates exactly."),
    out: Path | None = typer.Option(None, "--out", help="Write ids and distances to this .npz."),
    threads: int | None = typer.Option(None, "--threads"),
) -> None:
    """Search an index folder; prints queries/s and writes ids/distances with --out."""
    import time

    import numpy as np

    from embpress.atomic import atomic_open
    from embpress.vectors.index import Index
    from embpress.vectors.kernels import limit_threads
    from embpress.vectors.vecio import read_vectors

    for value, option in ((k, "--k"), (nprobe, "--nprobe"), (oversample, "--oversample"), (threads, "--threads")):
        _positive(value, option)
    if out is not None and out.is_dir():
        _fail(f"--out {out} is a folder; give a .npz file name")
    idx = _guard(lambda: Index.load(index_dir))
    q = _guard(lambda: np.asarray(read_vectors(queries)))

    def run():
        with limit_threads(threads):
            t = time.perf_counter()
            res = idx.search(q, k, nprobe=nprobe, oversample=oversample)
            return res, time.perf_counter() - t

    res, secs = _guard(run)
    if out is not None:
        with atomic_open(out, "wb") as fh:
            np.savez(fh, ids=res.ids, distances=res.distances)
    _out.print(f"{len(q):,} queries in {secs:.3f} s ({len(q) / secs:,.0f} queries/s)"
               + (f"; wrote {out}" if out else ""), markup=False)


@vectors_app.command("report")
def vectors_report(run_dir: Path = typer.Argument(..., help="A run folder holding results.jsonl.")) -> None:
    """Re-render report.md and pareto.png from a run's results.jsonl (nothing is re-measured)."""
    from embpress.bench.vectors_report import render_report

    md, png = _guard(lambda: render_report(run_dir))
    _out.print(f"wrote {md}, {png}", markup=False)


def main(argv: list[str] | None = None) -> NoReturn:
    """Entry point: usage errors (unknown options, values of the wrong type) also print one line and
    exit 2; an unexpected error prints one line and exits 1 (``EMBPRESS_DEBUG=1`` shows the traceback)."""
    try:
        rc = app(args=argv, prog_name="embpress", standalone_mode=False)
    except (typer.Abort, KeyboardInterrupt):
        console.print("interrupted (an interrupted run resumes where it stopped)", markup=False)
        sys.exit(130)
    except Exception as e:
        if not (hasattr(e, "format_message") and hasattr(e, "exit_code")):  # not a (vendored) click error
            _internal_error(e)
        # usage errors: an unknown option, a value of the wrong type, a missing one
        message = e.format_message()
        if type(e).__name__ == "NoArgsIsHelpError":  # `embpress vectors` alone: the help is the message
            console.print(message, markup=False, highlight=False)
            sys.exit(2)
        command = getattr(getattr(e, "ctx", None), "command_path", None)
        hint = f" (see `{command} --help`)" if command else ""
        console.print("error: " + " ".join(message.split()) + hint, markup=False, highlight=False)
        sys.exit(2)
    sys.exit(rc if isinstance(rc, int) else 0)


def _internal_error(e: Exception) -> NoReturn:
    """A bug, not bad input: still one line (exit 1) unless ``EMBPRESS_DEBUG`` asks for the traceback."""
    if os.environ.get("EMBPRESS_DEBUG"):
        raise e
    console.print(f"error: internal error {type(e).__name__}: {' '.join(str(e).split())} (set EMBPRESS_DEBUG=1 "
                  "for the traceback, and please report it)", markup=False, highlight=False)
    sys.exit(1)


@limit_app.command("probe")
def limit_probe(
    dims: str = typer.Option("4,8,16,32", "--dims", help="Comma-separated dimensions."),
    k: int = typer.Option(2, "--k", help="Relevant documents per query (every k-subset is a query)."),
    codecs: str = typer.Option("", "--codecs",
                               help="Document storage to probe after float32, e.g. 'sq8,sq4,bin,pq' ('pq' = pq{d/2}x4, 2 bits "
                               "per dim, probed at d >= 16 only: its k-means needs 16 documents)."),
    codec_dims: str | None = typer.Option(None, "--codec-dims", help="Dimensions the codecs are probed at (default all)."),
    out: Path = typer.Option(Path("runs/limit-probe"), "--out",
                             help="Run folder: results.jsonl (one record per trial; a rerun resumes), report.md, "
                             "probe.png."),
    seed: int = typer.Option(0, "--seed"),
    max_iters: int = typer.Option(100_000, "--max-iters", help="Iteration cap per optimisation (reference 100k)."),
    patience: int = typer.Option(1000, "--patience", help="Early stop after this many steps without loss gain."),
    threads: int = typer.Option(1, "--threads", help="torch threads."),
    start: int | None = typer.Option(None, "--start", help="First n of the search (default: the paper's fit at d)."),
    step: int = typer.Option(1, "--step", help="First galloping step (the reference: 1)."),
    sweep: bool = typer.Option(False, "--sweep/--no-sweep", help="After the search also measure critical n - 4 .. "
                               "+ 5 in float32 (the reference's phase 3; the reported n stays the search's)."),
    at: int | None = typer.Option(None, "--at", help="Check this one n (no search) at every --dims."),
) -> None:
    """Critical n (largest corpus whose every k-subset is some query's top-k) per dimension, free embeddings."""
    from embpress.bench.ctr import parse_list

    for value, option in ((k, "--k"), (max_iters, "--max-iters"), (patience, "--patience"), (threads, "--threads"),
                          (start, "--start"), (step, "--step")):
        _positive(value, option)
    dim_list = _guard(lambda: parse_list(dims, int, "dims"))
    cdims = set(dim_list) if codec_dims is None else set(_guard(lambda: parse_list(codec_dims, int, "codec-dims")))
    specs = [s.strip() for s in codecs.split(",") if s.strip()]
    for d in dim_list:
        if d < 1:
            _fail(f"--dims: every dimension must be >= 1, got {d}")

    def expand(spec: str, d: int) -> str | None:
        if spec != "pq":
            return spec
        return f"pq{d // 2}x4" if d >= 16 else None

    def for_dim(d: int) -> tuple[str, ...]:
        return tuple(e for e in (expand(s, d) for s in specs) if e is not None) if d in cdims else ()

    def check() -> None:
        from embpress.vectors import build_codec

        for d in cdims:
            for s in for_dim(d):
                build_codec(s)

    _guard(check)
    if at is not None and at <= k:
        _fail(f"--at must exceed --k {k}, got {at}")
    if start is not None and start <= k:
        _fail(f"--start must exceed --k {k}, got {start}")
    _check_out(out, "limit")
    import torch

    from embpress.bench.limit import run_probe, write_report
    from embpress.limit.probe import paper_critical_n

    torch.set_num_threads(threads)
    runs = _guard(lambda: run_probe(out, dim_list, k=k, codecs_for=for_dim, seed=seed, max_iters=max_iters,
                                    patience=patience, threads=threads, start=start, step=step, sweep=sweep, at=at,
                                    log=lambda m: _out.print(m, markup=False)))
    for r in runs:
        if r["critical_n"] is not None:
            fit = paper_critical_n(r["d"])
            _out.print(f"d={r['d']} k={k} {r['storage']}: critical n = {r['critical_n']}"
                       + (f" (paper fit {fit:.1f}, {r['critical_n'] / fit - 1:+.0%})" if k == 2 else ""),
                       markup=False)
    md, png = _guard(lambda: write_report(out))
    _out.print(f"wrote {out / 'results.jsonl'}, {md} and {png}", markup=False)


@limit_app.command("generate")
def limit_generate(
    docs: int = typer.Option(..., "--docs", help="Documents (46 gives a LIMIT-small-sized set, 50000 LIMIT)."),
    out: Path = typer.Option(..., "--out", help="Folder for corpus.jsonl, queries.jsonl, qrels.jsonl."),
    seed: int = typer.Option(0, "--seed"),
    queries: int = typer.Option(1000, "--queries", help="Queries (each asks about one item)."),
    k: int = typer.Option(2, "--k", help="Relevant documents per query."),
    items_per_doc: int = typer.Option(45, "--items-per-doc", help="Items each person likes."),
    vocab_from: Path | None = typer.Option(None, "--vocab-from",
                                           help="A LIMIT folder whose items and names to reuse (default: pseudo-words)."),
    subset: int | None = typer.Option(None, "--subset", help="Write only this many of the --docs documents: every "
                                      "judged one plus seeded random distractors (queries and qrels unchanged)."),
) -> None:
    """Write a LIMIT-style retrieval set ("<name> likes A, B, ...", "Who likes X?") in the MTEB/BEIR layout."""
    from embpress.limit.data import generate_limit, subset_limit, vocab_from_corpus, write_limit

    for value, option in ((docs, "--docs"), (queries, "--queries"), (k, "--k"), (items_per_doc, "--items-per-doc"),
                          (subset, "--subset")):
        _positive(value, option)
    if vocab_from is not None and not (vocab_from / "corpus.jsonl").is_file():
        _fail(f"--vocab-from {vocab_from}: no corpus.jsonl there")
    vocab = _guard(lambda: vocab_from_corpus(vocab_from)) if vocab_from is not None else None
    data = _guard(lambda: generate_limit(docs, n_queries=queries, k=k, items_per_doc=items_per_doc, seed=seed,
                                         vocab=vocab))
    if subset is not None:
        data = _guard(lambda: subset_limit(data, subset, seed=seed))
    _guard(lambda: write_limit(data, out))
    _out.print(f"wrote {out}: {len(data.corpus_ids):,} documents, {len(data.query_ids):,} queries, "
               f"{sum(len(v) for v in data.qrels.values()):,} qrels", markup=False)

if __name__ == "__main__":
    main()
