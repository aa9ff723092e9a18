"""SciFact (BEIR) with all-MiniLM-L6-v2: nDCG@10, recall@100 and recall@10 of every codec against bytes.

Runs ``embpress vectors eval --beir ../shared/data/scifact`` (the embeddings are encoded once into
the cache, about 3.5 minutes on 2 cores, then reused). Writes results.jsonl, report.md, pareto.png.

    python benchmarks/vectors_scifact.py --out /tmp/scifact-run
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "scifact"
CODECS = ("fp16,sq8,sq4,bin,pq24,pq48,pq96,opq48,rq16x8,pca128+sq8,mrl192+sq8,bebr1,itq768,rbin768,itq384")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--codecs", default=CODECS)
    ap.add_argument("--oversample", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--encode-threads", type=int, default=2)
    args = ap.parse_args()
    if not args.data.is_dir():
        raise SystemExit(f"{args.data} not found: SciFact lives in ../shared/data/scifact (see its README)")
    cmd = [sys.executable, "-m", "embpress.cli", "vectors", "eval", "--beir", str(args.data), "--codecs", args.codecs,
           "--k", "10", "--oversample", str(args.oversample), "--threads", str(args.threads),
           "--encode-threads", str(args.encode_threads), "--out", str(args.out)]
    print(" ".join(cmd), flush=True)
    raise SystemExit(subprocess.call(cmd))


if __name__ == "__main__":
    main()
