"""Peak memory and time of building production-size CTR data: the Criteo preset streamed into the
cache, and the ``criteo:`` loader on a Criteo-format TSV generated from the preset.

    python benchmarks/preset_generation.py --rows 45000000 [--tsv-rows 3000000] [--cache /tmp/cache]

Each build runs in its own process; its peak RSS (``ru_maxrss`` of the child) is reported beside
the bound :func:`embpress.data.synthetic.preset_memory_bound` states.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

CHILD = """
import sys, time, json
import torch
torch.set_num_threads(1)
from embpress.data import load_dataset
t = time.perf_counter()
ds = load_dataset(sys.argv[1], cache_dir=sys.argv[2], progress=False)
print(json.dumps({"seconds": time.perf_counter() - t, "ids": sum(f.num_embeddings for f in ds.fields),
                  "rows": len(ds.train) + len(ds.valid) + len(ds.test),
                  "observed_ids": int(sum(int((f.counts > 0).sum()) for f in ds.fields))}))
"""


def run(spec: str, cache: Path) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    out = subprocess.run([sys.executable, "-c", CHILD, spec, str(cache)], check=True, capture_output=True, text=True)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res.update(spec=spec, peak_rss_mb=round(max(peak, before) / 1024, 1))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=45_000_000)
    ap.add_argument("--tsv-rows", type=int, default=0, help="also write and load a Criteo TSV of this many rows")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/embpress-preset-cache"))
    args = ap.parse_args()
    from embpress.data.synthetic import SyntheticConfig, preset_memory_bound, write_criteo_tsv

    cfg = SyntheticConfig(preset="criteo", rows=args.rows)
    print(f"stated bound: {preset_memory_bound(cfg) / 2**20:,.0f} MiB (+ interpreter, numpy, torch)", flush=True)
    print(json.dumps(run(f"synthetic:preset=criteo,rows={args.rows}", args.cache)), flush=True)
    if args.tsv_rows:
        path = args.cache / f"criteo-{args.tsv_rows}.txt"
        t = time.perf_counter()
        if not path.exists():
            write_criteo_tsv(SyntheticConfig(preset="criteo", rows=args.tsv_rows), path)
        print(f"wrote {path} ({path.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - t:.0f} s", flush=True)
        print(json.dumps(run(f"criteo:{path}", args.cache)), flush=True)


if __name__ == "__main__":
    main()
