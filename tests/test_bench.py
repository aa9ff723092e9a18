"""The CTR benchmark: grid planning, records, resume by whole configuration, unreachable ratios,
report grouping and plot."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from typer.testing import CliRunner

from embpress.bench.ctr import BenchConfig, dataset_fingerprint, plan_trials, run_bench
from embpress.bench.records import RecordError, append_record, make_record, read_records
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
    assert len(recs) == 8 and {r["kind"] for r in recs} == {"ctr"}
    ok = [r for r in recs if r["status"] == "ok"]
    for r in ok:
        c, m = r["config"], r["metrics"]
        for key in ("dataset", "data", "model", "model_hparams", "method", "ratio", "seed", "dim", "epochs",
                    "batch_size", "lr", "hparams", "train", "threads"):
            assert key in c, key
        for key in ("full_bytes", "serving_bytes", "auc", "logloss", "train_samples_per_s", "infer_lookups_per_s"):
            assert key in m, key
        assert "embpress_version" in r["provenance"] and "git_sha" in r["provenance"]
        if c["method"] == "hash":
            assert m["serving_bytes"] <= m["full_bytes"] / c["ratio"]
        # training memory beside serving memory: counted and measured
        assert m["train_state_bytes"] >= m["serving_bytes"]
        assert m["peak_rss_bytes"] > m["train_state_bytes"] and m["peak_rss_scope"] in ("trial", "process")
    full = next(r["metrics"] for r in ok if r["config"]["method"] == "full")
    assert full["train_state_bytes"] >= 3 * full["full_bytes"]  # weights and two Adam moments
    unreachable = [r for r in recs if r["status"] == "unreachable"]
    assert {(r["config"]["method"], r["config"]["ratio"]) for r in unreachable} == {("hash", 100_000.0)}
    assert "budget" in unreachable[0]["reason"]

    # a second run trains nothing: ok trials are skipped, the unreachable one is re-checked (no
    # training) and, with the same verdict, not recorded again
    again = run_bench(cfg, tmp_path, load=load, log=lambda m: None)
    assert again.ran == 0 and again.skipped == 8 and loads == ["tiny", "tiny"]
    assert len(read_records(tmp_path / "results.jsonl")) == 8

    md, png = write_report(tmp_path)
    text = md.read_text()
    assert "cannot reach" in text and "| hash | 4x |" in text and "Which method at which budget" in text
    ok_rows = [r for r in aggregate(read_records(tmp_path / "results.jsonl")) if r.status == "ok"]
    assert sorted((r.method, r.seeds) for r in ok_rows) == [("full", [0, 1]), ("hash", [0, 1]), ("noid", [0, 1])]
    assert text.count("\n## ") == 1  # one table: the seeds are averaged, nothing else differs
    assert "| train state | peak RSS |" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_interrupted_trial_is_rerun(tmp_path, tiny_data):
    cfg = BenchConfig(datasets=("tiny",), methods=("noid",), seeds=(0,), epochs=1, batch_size=256, progress=False)
    append_record(tmp_path / "results.jsonl", make_record("ctr", {"dataset": "tiny"}, status="failed", reason="x"))
    with open(tmp_path / "results.jsonl", "a") as fh:
        fh.write('{"layout": 1, "kind": "ctr", "trunc')  # a kill mid-append: no newline at the end
    with pytest.warns(UserWarning, match="torn"):
        out = run_bench(cfg, tmp_path, load=lambda s: tiny_data, log=lambda m: None)
    assert out.ran == 1
    recs = read_records(tmp_path / "results.jsonl")  # the torn line was cut off by the next append
    assert [r["status"] for r in recs] == ["failed", "ok"]
    assert (tmp_path / "results.jsonl").read_text().count("\n") == 2


def test_damaged_foreign_and_other_kind_records_name_the_line(tmp_path):
    p = tmp_path / "results.jsonl"
    good = make_record("ctr", {"seed": 0}, status="ok", metrics={"auc": 0.7})
    append_record(p, good)
    line = p.read_text()
    cases = {
        "not json": r"results.jsonl:2: not a JSON record",
        "[1, 2]": r"results.jsonl:2: a record must be a JSON object",
        '{"dataset": "d", "auc": 0.7}': r"results.jsonl:2: not an embpress record of layout 1",
        line.replace("0.7", "0.9").strip(): r"results.jsonl:2: record checksum mismatch",
        line.replace('"layout": 1', '"layout": 7').strip(): r"results.jsonl:2: record layout 7",
    }
    for bad, match in cases.items():
        p.write_text(line + bad + "\n" + line)
        with pytest.raises(RecordError, match=match):
            read_records(p)
    p.write_text(line)
    with pytest.raises(RecordError, match=r"results.jsonl:1: this run folder holds ctr records"):
        read_records(p, kind="vectors")


def rec(status="ok", *, reason=None, dataset_name=None, **config):
    """A CTR record with the given config (defaults: dataset d, model dlrm) and the metrics the report reads."""
    config = {"dataset": "d", "model": "dlrm", "dim": 16, **config}
    auc = config.pop("auc", None)
    metrics = {} if status != "ok" else {"auc": auc, "logloss": 0.4, "serving_bytes": 10,
                                         "achieved_ratio": config["ratio"]}
    if dataset_name:
        metrics["dataset_name"] = dataset_name
    return make_record("ctr", config, status=status, metrics=metrics, reason=reason)


def test_recommend_uses_seed_spread():
    recs = []
    for seed, (a, b, c) in enumerate([(0.80, 0.795, 0.70), (0.81, 0.80, 0.71), (0.79, 0.79, 0.69)]):
        for m, auc in (("qr", a), ("hash", b), ("tt", c)):
            recs.append(rec(method=m, ratio=10.0, seed=seed, auc=auc))
    (methods, spread), = recommend(aggregate(recs)).values()
    assert methods == ["qr", "hash"] and spread == pytest.approx(0.01)
    assert "qr, hash" in render_markdown(recs)


def test_best_of_each_family_per_ratio():
    def recs_named(name=None):
        recs = []
        for seed in (0, 1):
            for m, ratio, auc in (("hash", 10.0, 0.70), ("robe", 10.0, 0.75), ("pep", 10.0, 0.72 + seed / 100),
                                  ("mde", 10.0, 0.60), ("robe", 100.0, 0.65), ("full", 1.0, 0.80)):
                recs.append(rec(method=m, ratio=ratio, seed=seed, auc=auc, dataset_name=name))
        recs.append(rec("unreachable", method="pep", ratio=100.0, seed=0, reason="too small", dataset_name=name))
        return recs

    best = best_by_family(aggregate(recs_named()))
    assert sorted(best) == [10.0, 100.0]
    assert best[10.0]["inter"].method == "robe" and best[10.0]["intra"].method == "pep"
    assert best[100.0]["inter"].method == "robe" and "intra" not in best[100.0]
    text = render_markdown(recs_named("tiny-frappe"))
    assert "## tiny-frappe — dlrm" in text and "Dataset spec: `d`." in text
    assert "| 10x | robe (10.0x) | 0.7500 ± 0.0000 | pep (10.0x) | 0.7250 ± 0.0071 | -0.0250 |" in text
    assert "| 100x | robe (100.0x) | 0.6500 ± 0.0000 | none reaches it |  |  |" in text


def test_cli_bench_and_report(tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["bench", "--dataset", TINY, "--methods", "full,hash", "--ratios", "4",
                              "--seeds", "0", "--batch-size", "256", "--out", str(tmp_path), "--no-progress"])
    assert res.exit_code == 0, res.output
    recs = read_records(tmp_path / "results.jsonl", kind="ctr")
    assert {r["config"]["method"] for r in recs} == {"full", "hash"}
    (tmp_path / "report.md").unlink()
    res = runner.invoke(app, ["report", str(tmp_path)])
    assert res.exit_code == 0 and (tmp_path / "report.md").exists()
    res = runner.invoke(app, ["bench", "--methods", "nope", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "unknown table method" in res.output
    res = runner.invoke(app, ["report", str(tmp_path / "missing")])
    assert res.exit_code == 2
    # the retrieval commands refuse this folder: it holds CTR records
    res = runner.invoke(app, ["vectors", "report", str(tmp_path)])
    assert res.exit_code == 2 and "holds ctr records" in res.output


def test_failures_later_completed_are_not_reported():
    recs = [rec("failed", method="hash", ratio=10.0, seed=0, reason="boom 0"),
            rec(method="hash", ratio=10.0, seed=0, auc=0.7),
            rec("failed", method="hash", ratio=10.0, seed=1, reason="boom 1")]
    text = render_markdown(recs)
    assert "boom 1" in text and "boom 0" not in text


def test_settings_that_differ_are_separate_rows_and_a_seed_counts_once():
    """The issue's example: --dim 16 and --dim 4 into one --out are two tables of one seed each, and
    a trial recorded twice (same whole configuration) is one seed, not two."""
    recs = [rec(method="hash", ratio=10.0, seed=0, auc=0.70, dim=16),
            rec(method="hash", ratio=10.0, seed=0, auc=0.60, dim=4),
            rec(method="hash", ratio=10.0, seed=0, auc=0.71, dim=16)]  # a repeat of the first trial
    rows = aggregate(recs)
    assert sorted((r.config["dim"], len(r.seeds), r.auc) for r in rows) == [(4, 1, 0.60), (16, 1, 0.71)]
    text = render_markdown(recs)
    assert "## d — dlrm (dim=16)" in text and "## d — dlrm (dim=4)" in text
    assert "1 record(s) set aside" in text
    # a method's rows differ in a hyper-parameter: the row names it
    recs = [rec(method="qr", ratio=10.0, seed=s, auc=0.7, hparams={"op": op}) for s in (0, 1) for op in ("mult", "add")]
    text = render_markdown(recs)
    assert "| qr (hparams.op=add) | 10x |" in text and "| qr (hparams.op=mult) | 10x |" in text


def test_resume_needs_the_whole_configuration(tmp_path, tiny_data):
    cfg = BenchConfig(datasets=("tiny",), methods=("noid",), seeds=(0,), epochs=1, batch_size=256, progress=False)
    assert run_bench(cfg, tmp_path, load=lambda s: tiny_data, log=lambda m: None).ran == 1
    for change in ({"lr": 1e-3}, {"batch_size": 512}, {"dim": 8}, {"epochs": 2}, {"models": ("wdl",)}):
        again = run_bench(dataclasses.replace(cfg, **change), tmp_path, load=lambda s: tiny_data, log=lambda m: None)
        assert again.ran == 1, change
    # the same spec with other content (a changed file) is another trial too
    other = dataclasses.replace(tiny_data, train=dataclasses.replace(
        tiny_data.train, label=np.ascontiguousarray(1 - tiny_data.train.label)))
    assert dataset_fingerprint(other) != dataset_fingerprint(tiny_data)
    assert run_bench(cfg, tmp_path, load=lambda s: other, log=lambda m: None).ran == 1
    assert run_bench(cfg, tmp_path, load=lambda s: tiny_data, log=lambda m: None).ran == 0
    assert len(read_records(tmp_path / "results.jsonl")) == 7


def test_file_dataset_fingerprint_is_the_sources_content(tiny_data):
    a = dataclasses.replace(tiny_data, info={"sources": [{"path": "/x/a.txt", "sha256": "ab" * 32}], "format": "criteo",
                                             "min_count": None, "seed": 0, "split": [0.8, 0.1, 0.1]})
    moved = dataclasses.replace(a, info={**a.info, "sources": [{"path": "/y/a.txt", "sha256": "ab" * 32}]})
    edited = dataclasses.replace(a, info={**a.info, "sources": [{"path": "/x/a.txt", "sha256": "cd" * 32}]})
    assert dataset_fingerprint(a) == dataset_fingerprint(moved) != dataset_fingerprint(edited)


def test_cli_executor_options_are_checked(tmp_path, monkeypatch):
    runner = CliRunner()
    res = runner.invoke(app, ["bench", "--executor", "dask", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "--executor must be serial or ray" in res.output
    res = runner.invoke(app, ["bench", "--cpus-per-trial", "2", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "apply to --executor ray" in res.output
    res = runner.invoke(app, ["bench", "--executor", "ray", "--threads", "2", "--cpus-per-trial", "1",
                              "--out", str(tmp_path)])
    assert res.exit_code == 2 and "differs from --cpus-per-trial" in res.output
    monkeypatch.setitem(__import__("sys").modules, "ray", None)  # as if ray were not installed
    for args in (["--executor", "ray"], ["--tune", "4"]):
        res = runner.invoke(app, ["bench", *args, "--out", str(tmp_path)])
        assert res.exit_code == 2 and "pip install 'embpress[ray]'" in res.output, res.output


def test_importing_embpress_never_imports_ray():
    import subprocess
    import sys

    code = ("import sys, embpress, embpress.cli, embpress.bench.ctr, embpress.bench.ray_executor, "
            "embpress.bench.tune, embpress.vectors.ray_encode, embpress.train; "
            "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_tuned_trial_identity_holds_the_chosen_values(tiny_data):
    from embpress.bench.ctr import Trial, trial_config

    cfg = BenchConfig(methods=("qr",), ratios=(4,), seeds=(0,), epochs=1)
    fp = dataset_fingerprint(tiny_data)
    plain = Trial("tiny", "dlrm", "qr", 4.0, 0)
    a = dataclasses.replace(plain, tuned=(("lr", 0.01), ("operation", "add"), ("sparse_lr", 0.02)),
                            search=(("trials", 8),))
    b = dataclasses.replace(a, tuned=(("lr", 0.01), ("operation", "mult"), ("sparse_lr", 0.02)))
    ca, cb, cp = (trial_config(t, cfg, fp) for t in (a, b, plain))
    assert len({fingerprint_of(c) for c in (ca, cb, cp)}) == 3
    assert ca["lr"] == 0.01 and ca["train"]["sparse_lr"] == 0.02 and ca["hparams"]["operation"] == "add"
    assert a.train_config(cfg).sparse_lr == 0.02 and plain.train_config(cfg).lr == cfg.lr
    assert "tune" not in cp and ca["tune"]["base_lr"] == cfg.lr


def fingerprint_of(config):
    from embpress.bench.records import trial_id

    return trial_id(config)


def test_sparse_optimizer_and_its_rate_are_part_of_a_trial(tiny_data):
    """Two optimizers (or two row learning rates) never share a row; the default (Adam) is left out of
    the identity, so records written before the option existed keep theirs."""
    from embpress.bench.ctr import Trial, trial_config

    fp = dataset_fingerprint(tiny_data)
    trial = Trial("tiny", "dlrm", "hash", 4.0, 0)
    adam = BenchConfig(methods=("hash",), ratios=(4,), seeds=(0,), epochs=1)
    ada = dataclasses.replace(adam, sparse_optimizer="rowwise_adagrad", sparse_lr=0.05)
    ada2 = dataclasses.replace(ada, sparse_lr=0.02)
    ca, cb, cc = (trial_config(trial, c, fp) for c in (adam, ada, ada2))
    assert "sparse_optimizer" not in ca["train"] and ca["train"]["sparse_lr"] == adam.lr
    assert cb["train"]["sparse_optimizer"] == "rowwise_adagrad" and cb["train"]["sparse_lr"] == 0.05
    assert len({fingerprint_of(c) for c in (ca, cb, cc)}) == 3
    assert trial.train_config(ada).sparse_optimizer == "rowwise_adagrad"
    with pytest.raises(ValueError, match="--sparse-opt must be one of"):
        BenchConfig(sparse_optimizer="sgd")
    with pytest.raises(ValueError, match="--sparse-lr must be a positive number"):
        BenchConfig(sparse_lr=0.0)
