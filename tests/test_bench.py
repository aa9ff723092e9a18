"""The CTR benchmark: grid planning, records, resume, unreachable ratios, report and plot."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from embpress.bench.ctr import BenchConfig, plan_trials, run_bench
from embpress.bench.records import append_record, read_records
from embpress.bench.report import aggregate, best_by_family, recommend, render_markdown, write_report
from embpress.cli import app
from embpress.data import SyntheticConfig, make_synthetic

TINY = "synthetic:rows=3000,num_fields=3,num_dense=2,max_cardinality=500,min_cardinality=5"


@pytest.fixture(scope="module")
def tiny_data():
    return make_synthetic(SyntheticConfig(rows=3000, num_fields=3, num_dense=2, max_cardinality=500,
                                          min_cardinality=5))


def test_plan_runs_references_once_per_seed():
    cfg = BenchConfig(methods=("full", "hash"), ratios=(10, 100), seeds=(0, 1))
    trials = plan_trials(cfg)
    assert [(t.method, t.ratio) for t in trials if t.seed == 0] == [("full", 1.0), ("hash", 10.0), ("hash", 100.0)]
    assert len(trials) == 6


def test_bad_grid_is_rejected():
    with pytest.raises(ValueError, match="unknown table method"):
        BenchConfig(methods=("nope",))
    with pytest.raises(ValueError, match="ratio"):
        BenchConfig(ratios=(0.5,))


def test_run_records_resume_and_report(tmp_path, tiny_data):
    cfg = BenchConfig(datasets=("tiny",), methods=("full", "noid", "hash"), ratios=(4, 100_000), seeds=(0, 1),
                      epochs=1, batch_size=256, progress=False)
    loads = []

    def load(spec):
        loads.append(spec)
        return tiny_data

    out = run_bench(cfg, tmp_path, load=load, log=lambda m: None)
    assert out.ran == 8 and not out.failed
    recs = read_records(tmp_path / "results.jsonl")
    assert len(recs) == 8
    ok = [r for r in recs if r["status"] == "ok"]
    for r in ok:
        for key in ("dataset", "model", "method", "ratio", "seed", "full_bytes", "serving_bytes", "auc",
                    "logloss", "train_samples_per_s", "infer_lookups_per_s", "embpress_version"):
            assert key in r, key
        if r["method"] == "hash":
            assert r["serving_bytes"] <= r["full_bytes"] / r["ratio"]
        # training memory beside serving memory: counted and measured
        assert r["train_state_bytes"] >= r["serving_bytes"]
        assert r["peak_rss_bytes"] > r["train_state_bytes"] and r["peak_rss_scope"] in ("trial", "process")
    full = next(r for r in ok if r["method"] == "full")
    assert full["train_state_bytes"] >= 3 * full["full_bytes"]  # weights and two Adam moments
    unreachable = [r for r in recs if r["status"] == "unreachable"]
    assert {(r["method"], r["ratio"]) for r in unreachable} == {("hash", 100_000.0)}
    assert "budget" in unreachable[0]["reason"]

    # a second run trains nothing: ok trials are skipped, the unreachable one is re-checked (no
    # training) and, with the same verdict, not recorded again
    again = run_bench(cfg, tmp_path, load=load, log=lambda m: None)
    assert again.ran == 0 and again.skipped == 8 and loads == ["tiny", "tiny"]
    assert len(read_records(tmp_path / "results.jsonl")) == 8

    md, png = write_report(tmp_path)
    text = md.read_text()
    assert "cannot reach" in text and "| hash | 4x |" in text and "Which method at which budget" in text
    assert "| train state | peak RSS |" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_interrupted_trial_is_rerun(tmp_path, tiny_data):
    cfg = BenchConfig(datasets=("tiny",), methods=("noid",), seeds=(0,), epochs=1, batch_size=256, progress=False)
    append_record(tmp_path / "results.jsonl", {"dataset": "tiny", "status": "failed", "method": "noid"})
    with open(tmp_path / "results.jsonl", "a") as fh:
        fh.write('{"dataset": "tiny", "trunc')  # a crash mid-append
    with pytest.warns(UserWarning, match="truncated"):
        out = run_bench(cfg, tmp_path, load=lambda s: tiny_data, log=lambda m: None)
    assert out.ran == 1
    with pytest.warns(UserWarning, match="truncated"):  # the torn line stays, as a line of its own
        recs = read_records(tmp_path / "results.jsonl")
    assert [r["status"] for r in recs] == ["failed", "ok"]


def test_malformed_records_name_the_line(tmp_path):
    p = tmp_path / "results.jsonl"
    p.write_text('{"a": 1}\nnot json\n{"b": 2}\n')
    with pytest.warns(UserWarning, match=r"results.jsonl:2"):
        assert read_records(p) == [{"a": 1}, {"b": 2}]
    p.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"results.jsonl:2: a record must be a JSON object"):
        read_records(p)


def test_recommend_uses_seed_spread():
    recs = []
    for seed, (a, b, c) in enumerate([(0.80, 0.795, 0.70), (0.81, 0.80, 0.71), (0.79, 0.79, 0.69)]):
        for m, auc in (("qr", a), ("hash", b), ("tt", c)):
            recs.append({"status": "ok", "dataset": "d", "model": "dlrm", "method": m, "ratio": 10.0, "seed": seed,
                         "auc": auc, "logloss": 0.4, "serving_bytes": 10, "achieved_ratio": 10.0})
    (methods, spread), = recommend(aggregate(recs)).values()
    assert methods == ["qr", "hash"] and spread == pytest.approx(0.01)
    assert "qr, hash" in render_markdown(recs)


def test_best_of_each_family_per_ratio():
    recs = []
    for seed in (0, 1):
        for m, ratio, auc in (("hash", 10.0, 0.70), ("robe", 10.0, 0.75), ("pep", 10.0, 0.72 + seed / 100),
                              ("mde", 10.0, 0.60), ("robe", 100.0, 0.65), ("full", 1.0, 0.80)):
            recs.append({"status": "ok", "dataset": "d", "model": "dlrm", "method": m, "ratio": ratio, "seed": seed,
                         "auc": auc, "logloss": 0.4, "serving_bytes": 10, "achieved_ratio": ratio})
    recs.append({"status": "unreachable", "dataset": "d", "model": "dlrm", "method": "pep", "ratio": 100.0,
                 "seed": 0, "reason": "too small"})
    best = best_by_family(aggregate(recs))
    assert sorted(best) == [10.0, 100.0]
    assert best[10.0]["inter"].method == "robe" and best[10.0]["intra"].method == "pep"
    assert best[100.0]["inter"].method == "robe" and "intra" not in best[100.0]
    for r in recs:
        r["dataset_name"] = "tiny-frappe"
    text = render_markdown(recs)
    assert "## tiny-frappe — dlrm" in text and "Dataset spec: `d`." in text
    assert "| 10x | robe (10.0x) | 0.7500 ± 0.0000 | pep (10.0x) | 0.7250 ± 0.0071 | -0.0250 |" in text
    assert "| 100x | robe (100.0x) | 0.6500 ± 0.0000 | none reaches it |  |  |" in text


def test_cli_bench_and_report(tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["bench", "--dataset", TINY, "--methods", "full,hash", "--ratios", "4",
                              "--seeds", "0", "--batch-size", "256", "--out", str(tmp_path), "--no-progress"])
    assert res.exit_code == 0, res.output
    recs = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert {r["method"] for r in recs} == {"full", "hash"}
    (tmp_path / "report.md").unlink()
    res = runner.invoke(app, ["report", str(tmp_path)])
    assert res.exit_code == 0 and (tmp_path / "report.md").exists()
    res = runner.invoke(app, ["bench", "--methods", "nope", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "unknown table method" in res.output
    res = runner.invoke(app, ["report", str(tmp_path / "missing")])
    assert res.exit_code == 2


def test_failures_later_completed_are_not_reported():
    base = {"dataset": "d", "model": "dlrm", "method": "hash", "ratio": 10.0}
    recs = [{**base, "seed": 0, "status": "failed", "reason": "boom 0"},
            {**base, "seed": 0, "status": "ok", "auc": 0.7, "logloss": 0.4, "serving_bytes": 10, "achieved_ratio": 10.0},
            {**base, "seed": 1, "status": "failed", "reason": "boom 1"}]
    text = render_markdown(recs)
    assert "boom 1" in text and "boom 0" not in text
