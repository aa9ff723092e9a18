"""The CTR grid on Ray: the same trials serially and as Ray tasks give the same records (timings and
hosts aside), and the executor is not part of a trial's identity (a Ray run resumes a serial one)."""

from __future__ import annotations

import dataclasses

import pytest

ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'embpress[ray]')")

from embpress.bench.ctr import MEASURED_METRICS, BenchConfig, run_bench  # noqa: E402
from embpress.bench.ray_executor import RayExecutor  # noqa: E402
from embpress.bench.records import read_records  # noqa: E402
from embpress.data import SyntheticConfig, make_synthetic  # noqa: E402


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance with 2 CPUs for the module (started once: it takes seconds)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny_data():
    return make_synthetic(SyntheticConfig(rows=6000, num_fields=3, num_dense=2, max_cardinality=500,
                                          min_cardinality=5))


def _comparable(rec):
    metrics = {k: v for k, v in rec["metrics"].items() if k not in MEASURED_METRICS}
    return rec["trial"], rec["config"], rec["status"], rec["reason"], metrics


def test_ray_grid_records_equal_serial_and_resume_across_executors(tmp_path, tiny_data, local_ray):
    cfg = BenchConfig(datasets=("tiny",), methods=("hash", "qr", "unified"), ratios=(2, 4), seeds=(0, 1),
                      epochs=2, batch_size=256, threads=1, progress=False)
    serial = run_bench(cfg, tmp_path / "serial", load=lambda s: tiny_data, log=lambda m: None)
    on_ray = run_bench(cfg, tmp_path / "ray", load=lambda s: tiny_data, log=lambda m: None,
                       executor=RayExecutor(cpus_per_trial=1))
    assert serial.ran == on_ray.ran == 12 and not serial.failed and not on_ray.failed
    a = sorted(_comparable(r) for r in read_records(tmp_path / "serial" / "results.jsonl"))
    b = sorted(_comparable(r) for r in read_records(tmp_path / "ray" / "results.jsonl"))
    assert a == b
    assert len({r[0] for r in a}) == 12 and all(r[2] == "ok" for r in a)
    assert all(0.5 < r[4]["auc"] < 1 for r in a)  # the trials trained (the synthetic task is learnable)
    # the executor is not part of the identity: Ray finds every serial trial recorded
    again = run_bench(cfg, tmp_path / "serial", load=lambda s: tiny_data, log=lambda m: None,
                      executor=RayExecutor(cpus_per_trial=1))
    assert again.ran == 0 and again.skipped == 12


def test_a_failing_trial_on_ray_is_recorded_like_a_serial_one(tmp_path, tiny_data, local_ray):
    cfg = BenchConfig(datasets=("tiny",), methods=("hash",), ratios=(2,), seeds=(0,), epochs=1, batch_size=256,
                      threads=1, progress=False, lr=1e12)  # diverges at once
    out = run_bench(cfg, tmp_path, load=lambda s: tiny_data, log=lambda m: None, executor=RayExecutor())
    assert out.ran == 1 and len(out.failed) == 1 and "loss became nan" in out.failed[0]
    (rec,) = read_records(tmp_path / "results.jsonl")
    assert rec["status"] == "failed" and rec["reason"].startswith("FloatingPointError")
    assert "traceback" in rec["metrics"] and rec["metrics"]["host"]


def test_ray_threads_must_equal_cpus_per_trial(tmp_path, tiny_data, local_ray):
    cfg = BenchConfig(datasets=("tiny",), methods=("hash",), ratios=(4,), seeds=(0,), epochs=1, threads=2,
                      progress=False)
    with pytest.raises(ValueError, match="--cpus-per-trial 1"):
        run_bench(cfg, tmp_path, load=lambda s: tiny_data, log=lambda m: None, executor=RayExecutor(cpus_per_trial=1))
    with pytest.raises(ValueError, match="cpus-per-trial"):
        RayExecutor(cpus_per_trial=0)


def test_tune_searches_on_validation_records_chosen_values_and_resumes(tmp_path, tiny_data, local_ray):
    import json

    from embpress.bench.report import write_report
    from embpress.bench.tune import LR_SPACE

    cfg = BenchConfig(datasets=("tiny",), methods=("qr",), ratios=(2,), seeds=(0, 1), epochs=1, batch_size=256,
                      threads=1, progress=False, tune=3)
    first = run_bench(cfg, tmp_path, load=lambda s: tiny_data, log=lambda m: None)
    assert first.ran == 2 and not first.failed
    searches = [json.loads(line) for line in (tmp_path / "tune.jsonl").read_text().splitlines()]
    assert len(searches) == 1 and len(searches[0]["trials"]) == 3
    s = searches[0]
    # the chosen point is the trial with the best validation AUC (test AUC is never reported to the search)
    assert s["valid_auc"] == max(t["best_valid_auc"] for t in s["trials"])
    assert s["chosen"] == next(t["point"] for t in s["trials"] if t["best_valid_auc"] == s["valid_auc"])
    assert set(s["chosen"]) == {"lr", "sparse_lr", "operation"} and LR_SPACE[1] <= s["chosen"]["lr"] <= LR_SPACE[2]
    # the defaults are one of the points, so the choice is never worse than them on validation
    assert {"lr": cfg.lr, "sparse_lr": cfg.lr, "operation": "mult"} in [t["point"] for t in s["trials"]]
    recs = read_records(tmp_path / "results.jsonl")
    for r in recs:  # the chosen values are the trial's identity, and were used
        c = r["config"]
        assert c["lr"] == s["chosen"]["lr"] and c["train"]["sparse_lr"] == s["chosen"]["sparse_lr"]
        assert c["hparams"]["operation"] == s["chosen"]["operation"] and c["tune"]["chosen"] == s["chosen"]
    # the defaults are other trials: an untuned run of the same grid records its own rows
    plain = run_bench(dataclasses.replace(cfg, tune=None), tmp_path, load=lambda s: tiny_data, log=lambda m: None)
    assert plain.ran == 2 and plain.skipped == 0
    # resume: no new search, no new trial
    again = run_bench(cfg, tmp_path, load=lambda s: tiny_data, log=lambda m: None)
    assert again.ran == 0 and again.skipped == 2
    assert len((tmp_path / "tune.jsonl").read_text().splitlines()) == 1
    md, _ = write_report(tmp_path)
    text = md.read_text()
    assert "qr (tuned)" in text and "Tuned rows" in text
