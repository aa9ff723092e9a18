"""Throughput and memory of CTR tables against table size: 1M, 10M and 33.8M ids (the Criteo preset
scaled), DLRM head, one thread, one process per point.

    python benchmarks/ctr_scale.py --out /tmp/scale                  # the grid, then a plot
    python benchmarks/ctr_scale.py --point hash --ratio 100 --scale 1 # one point, JSON on stdout
    python benchmarks/ctr_scale.py --point hash --ratio 100 --data synthetic:preset=criteo,rows=10000000

A point without ``--data`` trains ``--steps`` steps on random Zipf ids (exponent 0.8, ids already
in frequency order) over the scaled Criteo vocabulary, which measures the table's cost alone; with
``--data`` it trains one epoch of that dataset and reports test AUC. Every point reports train
samples/s (the trainer's own count, evaluation excluded), inference samples/s (eval forward of the
model), ``train_state_bytes`` (counted) and the process's peak RSS (``VmHWM``). ``plain`` is what
users write: one ``nn.Embedding`` with dense gradients and dense Adam.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from embpress.bench.ctr import peak_rss_bytes
from embpress.data.schema import CTRDataset, Split
from embpress.data.synthetic import PRESETS, _zipf_ranks
from embpress.models import build_model
from embpress.tables import Field, build_table, table_class
from embpress.tables.base import CompressedTable
from embpress.tables.full import INIT_STD
from embpress.train import TrainConfig, Trainer

SCALES = {"1M": 1_000_000 / 33_762_577, "10M": 10_000_000 / 33_762_577, "33.8M": 1.0}
METHODS = [("noid", 1), ("full", 1), ("plain", 1)] + [(m, r) for m in ("hash", "qr", "unified", "tt", "robe",
                                                                       "mgqe", "mde") for r in (10, 100)]


class PlainEmbedding(CompressedTable):
    """What users write: one ``nn.Embedding`` over all fields, dense gradients, dense Adam."""

    method = "plain"
    family = "reference"
    reference = True

    def __init__(self, *, fields, dim, budget=None):
        super().__init__(fields=fields, dim=dim, budget=budget)
        self.weight = nn.Embedding(self.total_ids, dim)
        nn.init.normal_(self.weight.weight, std=INIT_STD)

    def _lookup(self, ids):
        return self.weight(self.global_ids(ids))

    def serving_bytes(self):
        return self.total_ids * self.dim * 4


def random_zipf_data(scale: float, rows: int, seed: int = 0) -> CTRDataset:
    """Rows of random Zipf ids over the scaled Criteo vocabulary, random dense features and labels."""
    cards = [max(1, round(c * scale)) for c in PRESETS["criteo"]]
    rng = np.random.default_rng(seed)
    n = rows + 4096
    sparse = np.stack([_zipf_ranks(rng, n, c, 0.8) for c in cards], 1).astype(np.int32)
    dense = rng.standard_normal((n, 13), dtype=np.float32)
    label = (rng.random(n) < 0.25).astype(np.float32)
    fields = tuple(Field(f"C{i + 1}", c) for i, c in enumerate(cards))
    tr, va = slice(0, rows), slice(rows, rows + 2048)
    te = slice(rows + 2048, n)
    return CTRDataset("random-zipf", fields, tuple(f"I{i}" for i in range(13)), Split(dense[tr], sparse[tr], label[tr]),
                      Split(dense[va], sparse[va], label[va]), Split(dense[te], sparse[te], label[te]))


def point(args) -> dict:
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if args.data:
        from embpress.data import load_dataset

        data = load_dataset(args.data, progress=False)
    else:
        data = random_zipf_data(args.scale, args.steps * args.batch_size)
    load_s = time.perf_counter() - t0
    torch.manual_seed(0)
    if args.point == "plain":
        table = PlainEmbedding(fields=data.fields, dim=args.dim)
    else:
        budget = None if table_class(args.point.split("+")[0]).reference else f"{args.ratio}x"
        table = build_table(args.point, fields=data.fields, dim=args.dim, budget=budget)
    model = build_model("dlrm", table=table, num_dense=data.num_dense)
    cfg = TrainConfig(epochs=1, batch_size=args.batch_size, evals_per_epoch=1, progress=False,
                      eval_batch_size=args.eval_batch_size, sparse_optimizer=args.sparse_opt,
                      **({} if args.sparse_lr is None else {"sparse_lr": args.sparse_lr}))
    load_before = os.getloadavg()[0]
    res = Trainer(model, data, cfg).fit()
    load_after = os.getloadavg()[0]
    peak = peak_rss_bytes()  # training and evaluation; the artifact round trip below is not counted
    model.eval()
    artifact = {}
    if args.point != "plain":
        import tempfile

        from embpress import serving

        with tempfile.TemporaryDirectory(dir=args.artifact_dir) as tmp:
            path = Path(tmp) / "table.safetensors"
            table.save_serving(path)
            served = serving.load(path)
            ids = torch.from_numpy(data.test.sparse[:4096].astype("int64"))
            with torch.no_grad():
                exact = bool(torch.equal(served(ids), table(ids)))
            artifact = {"artifact_bytes": path.stat().st_size, "artifact_equal": exact}
            del served
    batches = list(data.test.batches(args.batch_size))[:20]
    with torch.no_grad():
        t = time.perf_counter()
        n = sum(len(y) for d, i, y in batches if model(d, i) is not None)
        infer = n / (time.perf_counter() - t)
    return {"method": args.point, "ratio": args.ratio, "ids": table.total_ids, "data": args.data or "random-zipf",
            "sparse_optimizer": cfg.sparse_optimizer, "sparse_lr": cfg.sparse_lr,
            "train_rows": len(data.train), "train_samples_per_s": res.train_samples_per_s,
            "infer_samples_per_s": infer, "test_auc": res.test_auc if args.data else None,
            "serving_bytes": table.serving_bytes(), "full_bytes": table.full_bytes,
            "train_state_bytes": res.train_state_bytes, "peak_rss_bytes": peak,
            "train_seconds": res.train_seconds, "load_seconds": load_s, "threads": args.threads,
            "batch_size": args.batch_size, "loadavg_1min": [load_before, load_after], **artifact}


def grid(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "scale.jsonl"
    # a point's identity: the method, its ratio, the scale, and how it trained (records written before the
    # optimizer options existed trained with Adam at TrainConfig's sparse_lr)
    default_lr = TrainConfig().sparse_lr

    def key(method, ratio, scale, opt, lr, steps, batch_size, threads):
        return (method, float(ratio), scale, opt, float(lr if lr is not None else default_lr), steps, batch_size,
                threads)

    done = set()  # a record without "steps" (written before it was kept) matches nothing: it runs again
    if results.exists():
        done = {key(r["method"], r["ratio"], r["scale"], r.get("sparse_optimizer", "adam"), r.get("sparse_lr"),
                    r.get("steps"), r.get("batch_size"), r.get("threads"))
                for r in map(json.loads, results.read_text().splitlines())}
    scales = args.scales.split(",")
    methods = [(m, r) for m, r in METHODS if not args.methods or m in args.methods.split(",")]
    skip = set(filter(None, args.skip.split(",")))
    for s in scales:
        for m, r in methods:
            if key(m, r, s, args.sparse_opt, args.sparse_lr, args.steps, args.batch_size, args.threads) in done:
                continue
            how = {"scale": s, "steps": args.steps, "batch_size": args.batch_size, "threads": args.threads,
                   "sparse_optimizer": args.sparse_opt,
                   "sparse_lr": default_lr if args.sparse_lr is None else args.sparse_lr}
            if f"{m}@{s}" in skip:
                rec = {"method": m, "ratio": r, **how, "error": "skipped (--skip): " + args.skip_reason}
                with open(results, "a") as fh:
                    fh.write(json.dumps(rec) + "\n")
                continue
            cmd = [sys.executable, __file__, "--point", m, "--ratio", str(r), "--scale", str(SCALES[s]),
                   "--steps", str(args.steps), "--threads", str(args.threads), "--batch-size", str(args.batch_size),
                   "--sparse-opt", args.sparse_opt] + ([] if args.sparse_lr is None else ["--sparse-lr", str(args.sparse_lr)])
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode == 0:
                rec = json.loads(proc.stdout.strip().splitlines()[-1])
            else:
                tail = (proc.stderr.strip().splitlines() or ["killed"])[-1]
                rec = {"method": m, "ratio": r, "error": f"exit {proc.returncode}: {tail}"}
            rec.update(how)
            with open(results, "a") as fh:
                fh.write(json.dumps(rec) + "\n")
            print(json.dumps(rec), flush=True)
    plot(results, out / "scale.png")


def plot(results: Path, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [r for r in map(json.loads, results.read_text().splitlines()) if "error" not in r]
    fig, ax = plt.subplots(figsize=(7.5, 5))
    methods = sorted({r["method"] for r in recs})
    cmap = plt.get_cmap("tab10")
    def series(r):
        return r["method"], r["ratio"], r.get("sparse_optimizer", "adam")

    for key in sorted({series(r) for r in recs}):
        pts = sorted((r["ids"], r["train_samples_per_s"]) for r in recs if series(r) == key)
        label = key[0] if key[0] in ("noid", "full", "plain") else f"{key[0]}@{key[1]:g}x"
        label += "" if key[2] == "adam" else f" ({key[2]})"
        ax.plot(*zip(*pts, strict=True), marker="o" if key[1] != 10 else "s", ls="--" if key[1] == 10 else "-",
                color=cmap(methods.index(key[0]) % 10), label=label)
    ax.set_xscale("log")
    ax.set_xlabel("ids in the table (Criteo preset scaled)")
    ax.set_ylabel("train samples/s (DLRM, batch 2048, 1 thread)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--point", help="run one method in this process and print its JSON record")
    ap.add_argument("--ratio", type=float, default=1)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--data", default="", help="train one epoch of this dataset spec instead of random ids")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=2048)
    ap.add_argument("--eval-batch-size", type=int, default=4096,
                    help="evaluation batch (its activations are part of the peak RSS)")
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--sparse-opt", default="adam", help="optimizer of the embedding rows: adam or rowwise_adagrad")
    ap.add_argument("--sparse-lr", type=float, default=None, help="its learning rate (default: TrainConfig's)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="runs/scale")
    ap.add_argument("--scales", default="1M,10M,33.8M")
    ap.add_argument("--methods", default="")
    ap.add_argument("--artifact-dir", default=None, help="where the serving artifact is written (then deleted)")
    ap.add_argument("--skip", default="", help="points not to run, e.g. plain@33.8M (recorded as skipped)")
    ap.add_argument("--skip-reason", default="")
    args = ap.parse_args()
    if args.point:
        print(json.dumps(point(args)), flush=True)
    else:
        grid(args)


if __name__ == "__main__":
    main()
