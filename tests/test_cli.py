"""Bad input to the ``embpress`` command is refused before any work: one line on stderr naming the
value and the fix, exit status 2, never a traceback, and no results written."""

from __future__ import annotations

import urllib.error

import numpy as np
import pytest

from embpress.bench.records import append_record, make_record
from embpress.cli import main

TINY = "synthetic:rows=300,num_fields=2,num_dense=1,max_cardinality=50"


@pytest.fixture
def files(tmp_path):
    np.save(tmp_path / "base.npy", np.random.default_rng(0).standard_normal((200, 8)).astype(np.float32))
    (tmp_path / "afile").write_text("x")
    (tmp_path / "a.libfm").write_text("1 3:1 17:1\n0 4:1 18:1\n")
    (tmp_path / "c.tsv").write_text("\t".join(["1"] + ["0"] * 13 + ["68fd1e64"] * 26) + "\n")
    ctr = tmp_path / "ctr_run"
    append_record(ctr / "results.jsonl", make_record("ctr", {"seed": 0}, status="failed", reason="x"))
    vec = tmp_path / "vec_run"
    append_record(vec / "results.jsonl", make_record("vectors", {"seed": 0}, status="failed", reason="x"))
    return tmp_path


CASES = [
    # (argv with {d} for the folder of the files, what the one line must say)
    ("bench --methods , --out {d}/r", "--methods: empty list"),
    ("bench --methods hash,,qr --out {d}/r", "--methods: empty element"),
    ("bench --ratios '' --out {d}/r", "--ratios: empty list"),
    ("bench --ratios 10,abc --out {d}/r", "'abc' in '10,abc' is not a float"),
    ("bench --ratios 0.5 --out {d}/r", "compression ratio must be a finite number >= 1"),
    ("bench --ratios inf --out {d}/r", "compression ratio must be a finite number >= 1"),
    ("bench --seeds 0,0 --out {d}/r", "--seeds: 0 given more than once"),
    ("bench --seeds -1 --out {d}/r", "--seeds: -1 is not a non-negative int"),
    ("bench --threads 0 --out {d}/r", "--threads must be an int >= 1, got 0"),
    ("bench --threads -3 --out {d}/r", "--threads must be an int >= 1"),
    ("bench --epochs 0 --out {d}/r", "--epochs must be an int >= 1, got 0"),
    ("bench --dim 0 --out {d}/r", "--dim must be an int >= 1"),
    ("bench --batch-size 0 --out {d}/r", "--batch-size must be an int >= 1"),
    ("bench --lr -1 --out {d}/r", "--lr must be a positive number"),
    ("bench --lr nan --out {d}/r", "--lr must be a positive number"),
    ("bench --model nope --out {d}/r", "unknown model 'nope'"),
    ("bench --methods nope --out {d}/r", "unknown table method 'nope'"),
    ("bench --out {d}/afile", "is a file; give a folder"),
    ("bench --dataset " + TINY + " --out {d}/vec_run", "holds vectors records"),
    ("bench --dataset synthetic --dataset synthetic --out {d}/r", "--datasets: synthetic given more than once"),
    ("bench --dataset libfm:{d}/a.libfm,{d}/a.libfm --out {d}/r", "is given twice"),
    ("bench --dataset criteo:{d}/c.tsv,{d}/./c.tsv --out {d}/r", "is given twice"),
    ("bench --dataset criteo:{d}/missing.tsv --out {d}/r", "data file not found"),
    ("bench --dataset criteo: --out {d}/r", "criteo spec needs a file"),
    ("bench --dataset nope:x --out {d}/r", "unknown dataset format 'nope'"),
    ("bench --dataset synthetic:rows=ten --out {d}/r", "synthetic option rows='ten'"),
    ("bench --dataset synthetic:bogus=1 --out {d}/r", "synthetic option 'bogus=1'"),
    ("bench --dim abc --out {d}/r", "Invalid value for '--dim'"),
    ("bench --bogus", "No such option: --bogus"),
    ("report {d}/afile", "is a file, not a run folder"),
    ("report {d}/missing", "not found: run `embpress bench`, `embpress vectors eval` or `embpress limit probe`"),
    ("vectors report {d}/ctr_run", "holds ctr records"),
    ("vectors eval --codecs , --base {d}/base.npy --out {d}/r", "--codecs: empty list"),
    ("vectors eval --codecs sq8,pq7y --base {d}/base.npy --out {d}/r", "unknown or malformed codec spec 'pq7y'"),
    ("vectors eval --codecs sq8 --base {d}/base.npy --queries {d}/base.npy --out {d}/r", "is the --base file"),
    ("vectors eval --codecs sq8 --base {d}/base.npy --out {d}/afile", "is a file; give a folder"),
    ("vectors eval --codecs sq8 --base {d}/base.npy --out {d}/ctr_run", "holds ctr records"),
    ("vectors eval --codecs sq8 --base {d}/base.npy --threads 0 --out {d}/r", "--threads must be >= 1"),
    ("vectors eval --codecs sq8 --base {d}/base.npy --k 0 --out {d}/r", "--k must be >= 1"),
    ("vectors eval --codecs sq8 --base {d}/base.npy --oversample 0 --out {d}/r", "--oversample must be >= 1"),
    ("vectors eval --codecs sq8 --base {d}/base.npy --n-queries 0 --out {d}/r", "--n-queries must be >= 1"),
    ("vectors eval --codecs sq8 --base {d}/base.npy --train-size 0 --out {d}/r", "--train-size must be >= 1"),
    ("vectors eval --codecs sq8 --base {d}/base.npy --qps-time -1 --out {d}/r", "--qps-time must be >= 0"),
    ("vectors eval --codecs sq8 --base {d}/base.npy --metric manhattan --out {d}/r", "unknown metric"),
    ("vectors eval --codecs sq8 --base {d}/base.npy --metrics-backend x --out {d}/r", "--metrics-backend"),
    ("vectors eval --codecs sq8 --base {d}/missing.npy --out {d}/r", "file not found"),
    ("vectors eval --codecs sq8 --base {d} --out {d}/r", "(it is a folder)"),
    ("vectors eval --codecs sq8 --out {d}/r", "exactly one of --base"),
    ("vectors eval --codecs sq8 --base {d}/base.npy --model m --out {d}/r", "apply to --beir only"),
    ("vectors eval --codecs pca64+sq8 --base {d}/base.npy --n-queries 50 --out {d}/r", "pca64"),
    ("vectors eval --codecs sq8 --base {d}/base.npy --out {d}/r", "--n-queries 1000 is more than half of the 200 vectors"),
    ("vectors eval --codecs sq8 --base {d}/base.npy --n-queries 150 --out {d}/r", "give --n-queries <= 100"),
    ("vectors eval --base {d}/base.npy --out {d}/r", "Missing option '--codecs'"),
    ("vectors eval --codecs sq8 --base {d}/afile --out {d}/r", "afile"),
    ("vectors build --base {d}/base.npy --index ivf,sq8 --out {d}/r", "malformed IVF spec"),
    ("vectors build --base {d}/base.npy --index ivf8,pq7y --out {d}/r", "unknown or malformed codec spec"),
    ("vectors build --base {d}/base.npy --index ivf8,sq8 --nprobe 9 --out {d}/r", "nprobe=9 exceeds nlist=8"),
    ("vectors build --base {d}/base.npy --index sq8 --nprobe 0 --out {d}/r", "--nprobe must be >= 1"),
    ("vectors build --base {d}/base.npy --index sq8 --train-size 0 --out {d}/r", "--train-size must be >= 1"),
    ("vectors build --base {d}/base.npy --index sq8 --metric x --out {d}/r", "unknown metric"),
    ("vectors build --base {d}/missing.npy --index sq8 --out {d}/r", "not found"),
    ("vectors build --base {d}/a.libfm --index sq8 --out {d}/r", "cannot stream '.libfm' files"),
    ("vectors build --base {d}/base.npy --index sq8 --out {d}/afile", "is a file; give a folder"),
    ("vectors build --base {d}/base.npy --index ivf500,sq8 --out {d}/r", "nlist=500 needs at least 500"),
    ("vectors search {d}/missing --queries {d}/base.npy --out {d}/r", "not an embpress index folder"),
    ("vectors search {d} --queries {d}/base.npy --k 0 --out {d}/r", "--k must be >= 1"),
    ("limit probe --dims 4,x --out {d}/r", "--dims"),
    ("limit probe --dims 4 --codecs zz9 --out {d}/r", "zz9"),
    ("limit probe --dims 4 --at 2 --out {d}/r", "--at must exceed --k 2"),
    ("limit probe --dims 4 --out {d}/vec_run", "holds vectors records"),
    ("limit probe --dims 4 --step 0 --out {d}/r", "--step must be >= 1"),
    ("limit generate --docs 100 --subset 10 --out {d}/r", "subset size must be in [46"),
    ("limit generate --docs 5 --out {d}/r", "need at least 46 documents"),
    ("limit generate --docs 50 --vocab-from {d} --out {d}/r", "no corpus.jsonl"),
    ("vectors eval --base {d}/base.npy --multivector fde:R=2 --codecs sq8 --out {d}/r", "--multivector needs --beir"),
]


def run_main(argv: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.err + captured.out


@pytest.mark.parametrize("argv,match", CASES, ids=[c[0].split(" --out")[0][:60] for c in CASES])
def test_bad_input_is_one_line_and_exit_2(files, capsys, argv, match):
    import shlex

    code, output = run_main(shlex.split(argv.format(d=files)), capsys)
    lines = output.strip().splitlines()
    assert code == 2, output
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    assert match in lines[0], output
    assert "Traceback" not in output
    assert not (files / "r").exists()  # nothing was written


def test_a_download_without_network_says_to_pass_a_local_path(tmp_path, capsys, monkeypatch):
    from embpress.data import movielens

    def offline(url, dest, *, progress):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(movielens, "_fetch", offline)
    monkeypatch.setenv("EMBPRESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    code, output = run_main(["bench", "--dataset", "movielens:100k", "--out", str(tmp_path / "r"), "--no-progress"],
                            capsys)
    lines = output.strip().splitlines()
    assert code == 2 and lines[-1].startswith("error: could not download"), output
    assert "pass the folder: 'movielens:/path/to/ml-100k'" in lines[-1]
    assert not list((tmp_path / "cache" / "downloads").glob("*"))  # no half download left
    assert not (tmp_path / "r" / "results.jsonl").exists()


def test_no_arguments_prints_the_help(capsys):
    code, output = run_main(["vectors"], capsys)
    assert code == 2 and "Usage: embpress vectors" in output and "Traceback" not in output


def test_an_unexpected_error_is_one_line_unless_debugging(tmp_path, capsys, monkeypatch):
    from embpress.bench import ctr

    def broken(*args, **kwargs):
        raise RuntimeError("something\nwent wrong")

    monkeypatch.setattr(ctr, "run_bench", broken)
    argv = ["bench", "--dataset", TINY, "--out", str(tmp_path / "r"), "--no-progress"]
    code, output = run_main(argv, capsys)
    assert code == 1 and output.strip() == ("error: internal error RuntimeError: something went wrong (set "
                                            "EMBPRESS_DEBUG=1 for the traceback, and please report it)")
    monkeypatch.setenv("EMBPRESS_DEBUG", "1")
    with pytest.raises(RuntimeError, match="went wrong"):
        main(argv)


def test_vectors_build_and_search(files, capsys):
    out = files / "idx"
    code, output = run_main(["vectors", "build", "--base", str(files / "base.npy"), "--index", "ivf4,sq8",
                             "--out", str(out), "--rerank", "--train-size", "150", "--nprobe", "4", "--metric", "l2",
                             "--no-progress", "--threads", "1"], capsys)
    assert code == 0 and "B/vector in RAM" in output, output
    code, output = run_main(["vectors", "search", str(out), "--queries", str(files / "base.npy"), "--k", "3",
                             "--oversample", "4", "--out", str(files / "hits.npz")], capsys)
    assert code == 0 and "queries/s" in output, output
    hits = np.load(files / "hits.npz")
    assert hits["ids"].shape == (200, 3)
    assert (hits["ids"][:, 0] == np.arange(200)).all()  # each vector finds itself first after re-ranking
    code, output = run_main(["vectors", "search", str(out), "--queries", str(files / "base.npy"),
                             "--nprobe", "5"], capsys)
    assert code == 2 and "nprobe=5 exceeds nlist=4" in output


def test_limit_probe_and_generate(tmp_path, capsys):
    import json

    code, output = run_main(["limit", "probe", "--dims", "2", "--codecs", "sq8", "--out", str(tmp_path / "p")], capsys)
    assert code in (0, None), output
    assert "d=2 k=2 float32: critical n = 3" in output and "d=2 k=2 sq8: critical n = 3" in output
    recs = [json.loads(line) for line in (tmp_path / "p" / "results.jsonl").read_text().splitlines()]
    assert {r["kind"] for r in recs} == {"limit"} and {r["config"]["storage"] for r in recs} == {"float32", "sq8"}
    assert (tmp_path / "p" / "probe.png").stat().st_size > 0
    (tmp_path / "p" / "report.md").unlink()
    code, output = run_main(["report", str(tmp_path / "p")], capsys)  # the one report command knows the kind
    assert code in (0, None) and "| 2 | – | 3 | 3 |" in (tmp_path / "p" / "report.md").read_text(), output
    code, output = run_main(["limit", "probe", "--dims", "2", "--out", str(tmp_path / "p")], capsys)
    assert "recorded" in output and len((tmp_path / "p" / "results.jsonl").read_text().splitlines()) == len(recs)
    code, output = run_main(["limit", "generate", "--docs", "60", "--queries", "30", "--items-per-doc", "10",
                             "--out", str(tmp_path / "g")], capsys)
    assert code in (0, None) and "60 documents, 30 queries, 60 qrels" in output, output
