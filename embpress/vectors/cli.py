"""``embpress vectors ...``: parse options, call the library, print. No logic lives here."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Compress corpus vectors, search the codes, and benchmark recall against bytes.")
_err = Console(stderr=True)
_out = Console()


def _fail(msg: str) -> typer.Exit:
    _err.print(f"[bold red]error:[/] {msg}", highlight=False)
    return typer.Exit(code=2)


@app.command("eval")
def eval_cmd(
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
) -> None:
    """Benchmark codecs on vectors (--base) or on a BEIR folder encoded with a text model (--beir)."""
    from embpress.vectors.bench import EvalSet, holdout_queries, run_eval, sample_rows
    from embpress.vectors.codec import build_codec
    from embpress.vectors.metric import as_metric
    from embpress.vectors.report import render_report

    specs = [s.strip() for s in codecs.split(",") if s.strip()]
    try:
        as_metric(metric)
        for s in specs:
            if s != "float32":
                build_codec(s)  # syntax check before loading or encoding anything
        if (base is None) == (beir is None):
            raise ValueError("give exactly one of --base (vectors) or --beir (a BEIR folder)")
        if beir is not None:
            from embpress.vectors.beir import load_beir
            from embpress.vectors.encode import default_model_path, encode_texts, model_label

            ds = load_beir(beir, split=split)
            model_name = model or default_model_path()
            _out.print(f"{ds.name}: {len(ds.corpus_ids):,} documents, {len(ds.query_ids):,} judged queries")
            xq = encode_texts(ds.query_texts, model=model_name, cache_dir=cache, num_threads=encode_threads,
                              progress=progress, description="queries")
            xb = encode_texts(ds.corpus_texts, model=model_name, cache_dir=cache, num_threads=encode_threads,
                              progress=progress, description="corpus")
            data = EvalSet(f"{ds.name}:{model_label(model_name)}", xb, xq, corpus_ids=ds.corpus_ids,
                           query_ids=ds.query_ids, qrels=ds.qrels, metrics_backend=metrics_backend)
        else:
            from embpress.vectors.vecio import read_vectors

            assert base is not None
            xb = read_vectors(base)
            if queries is not None:
                xq = read_vectors(queries)
            else:
                xb, xq = holdout_queries(xb, min(n_queries, xb.shape[0] - 1), seed=seed)
            data = EvalSet(base.stem, xb, xq)
        if train_size is not None:
            data = dataclasses.replace(data, train=sample_rows(data.base, train_size, seed=seed))
        run_eval(data, specs, out, k=k, oversample=oversample, metric=metric, seed=seed, threads=threads,
                 with_faiss=faiss, qps_time=qps_time, progress=progress, log=_out.print)
        md, png = render_report(out)
    except (ValueError, TypeError, FileNotFoundError, ImportError) as e:
        raise _fail(str(e)) from None
    _out.print(f"wrote {out / 'results.jsonl'}, {md}, {png}")


@app.command("build")
def build_cmd(
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
    from embpress.vectors.kernels import limit_threads

    try:
        if threads is not None and threads < 1:
            raise ValueError(f"--threads must be >= 1, got {threads}")
        with limit_threads(threads):
            idx, t = build_index(base, index, out, metric=metric, train_size=train_size, rerank=rerank,
                                 nprobe=nprobe, seed=seed, block_size=block_size, d=dim, progress=progress)
    except (ValueError, TypeError, FileNotFoundError) as e:
        raise _fail(str(e)) from None
    _out.print(f"{out}: {idx!r}; {idx.bytes_per_vector()} B/vector in RAM, fit {t['fit_s']:.1f} s, "
               f"encode {t['vectors_per_s']:,.0f} vectors/s")


@app.command("search")
def search_cmd(
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

    try:
        if threads is not None and threads < 1:
            raise ValueError(f"--threads must be >= 1, got {threads}")
        idx = Index.load(index_dir)
        q = read_vectors(queries)
        with limit_threads(threads):
            t = time.perf_counter()
            res = idx.search(np.asarray(q), k, nprobe=nprobe, oversample=oversample)
            secs = time.perf_counter() - t
    except (ValueError, TypeError, FileNotFoundError) as e:
        raise _fail(str(e)) from None
    if out is not None:
        with atomic_open(out, "wb") as fh:
            np.savez(fh, ids=res.ids, distances=res.distances)
    _out.print(f"{len(q):,} queries in {secs:.3f} s ({len(q) / secs:,.0f} queries/s)"
               + (f"; wrote {out}" if out else ""))


@app.command("report")
def report_cmd(run_dir: Path = typer.Argument(..., help="A run folder holding results.jsonl.")) -> None:
    """Re-render report.md and pareto.png from a run's results.jsonl (nothing is re-measured)."""
    from embpress.vectors.report import render_report

    try:
        md, png = render_report(run_dir)
    except (ValueError, FileNotFoundError) as e:
        raise _fail(str(e)) from None
    _out.print(f"wrote {md}, {png}")
