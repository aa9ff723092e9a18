"""The kill drill: a small bench killed with SIGKILL at random points, several times, then resumed,
ends with exactly the records of an uninterrupted run (speed figures aside), one per trial."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

from embpress.bench import records as records_module
from embpress.bench.ctr import MEASURED_METRICS, BenchConfig, run_bench
from embpress.bench.records import read_records
from embpress.data import SyntheticConfig, make_synthetic

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the drill forks the bench process")

CFG = BenchConfig(datasets=("tiny",), methods=("noid", "hash", "qr"), ratios=(4.0,), seeds=(0, 1), epochs=1,
                  batch_size=256, threads=1, progress=False)
TRIALS = 6
ROUNDS = 6
MAX_KILLS = 8


@pytest.fixture(scope="module")
def data():
    import torch._dynamo  # noqa: F401  (torch's optimisers import it on first use: 1.5 s in every child otherwise)

    return make_synthetic(SyntheticConfig(rows=1000, num_fields=3, num_dense=2, max_cardinality=300,
                                          min_cardinality=5))


def comparable(recs: list[dict]) -> dict[str, tuple]:
    """Trial id -> (config, status, reason, metrics less speed figures); asserts one record per trial."""
    out = {}
    for r in recs:
        assert r["trial"] not in out, f"trial {r['trial']} recorded twice"
        m = {k: v for k, v in r["metrics"].items() if k not in MEASURED_METRICS}
        out[r["trial"]] = (r["config"], r["status"], r["reason"], m)
    return out


def run_child(out, data, *, kill_after: float | None = None, kill_on_append: tuple[int, bool] | None = None
              ) -> int | None:
    """Run the bench in a forked process; SIGKILL it after ``kill_after`` seconds, or let it kill itself
    at its ``n``-th append (``kill_on_append=(n, torn)``: half-way through the line when ``torn``, just
    after it otherwise). Returns its exit status, or None if killed."""
    pid = os.fork()
    if pid == 0:  # the child: run, then leave without pytest's teardown
        try:
            if kill_on_append is not None:
                nth, torn = kill_on_append
                real_write, count = os.write, [0]

                def killing_write(fd, data_bytes):
                    count[0] += 1
                    if count[0] == nth:
                        real_write(fd, data_bytes[:len(data_bytes) // 2] if torn else data_bytes)
                        os.kill(os.getpid(), signal.SIGKILL)
                    return real_write(fd, data_bytes)

                records_module.os.write = killing_write
            run_bench(CFG, out, load=lambda s: data, log=lambda m: None)
            os._exit(0)
        except BaseException:
            os._exit(1)
    if kill_after is not None:
        deadline = time.monotonic() + kill_after
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.005)
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    return None if code == -signal.SIGKILL else code


def test_sigkill_at_random_points_then_resume_gives_the_uninterrupted_records(tmp_path, data):
    t0 = time.monotonic()
    assert run_child(tmp_path / "clean", data) == 0
    duration = time.monotonic() - t0
    clean = comparable(read_records(tmp_path / "clean" / "results.jsonl"))
    assert len(clean) == TRIALS

    rng = np.random.default_rng(11)
    kills_at = []  # complete records in the file at each kill: where in the grid the kills landed
    for round_ in range(ROUNDS):
        out = tmp_path / f"killed{round_}"
        path = out / "results.jsonl"
        kills = 0
        while kills < MAX_KILLS:
            code = run_child(out, data, kill_after=float(rng.uniform(0.0, duration)))
            if code is not None:
                break
            kills += 1
            kills_at.append(path.read_bytes().count(b"\n") if path.exists() else 0)
        else:
            assert run_child(out, data) == 0
        assert comparable(read_records(path)) == clean, f"round {round_}: after {kills} kills the records differ"
    assert len(kills_at) >= 3, kills_at  # kills landed before the end (where: 0..5 records, see the note)


def test_kill_at_every_append_then_resume(tmp_path, data):
    """Deterministic kill points: just after each append, and half-way through the 1st and 3rd."""
    clean_dir = tmp_path / "clean"
    assert run_child(clean_dir, data) == 0
    clean = comparable(read_records(clean_dir / "results.jsonl"))
    out = tmp_path / "killed"
    path = out / "results.jsonl"
    for nth in range(1, TRIALS):  # each resumed run records one more trial, then dies
        assert run_child(out, data, kill_on_append=(1, False)) is None
        assert path.read_bytes().count(b"\n") == nth
    assert run_child(out, data) == 0
    assert comparable(read_records(path)) == clean

    out = tmp_path / "torn"
    path = out / "results.jsonl"
    for nth in (1, 3):  # tear the 1st append of the first run, the 3rd of the second
        assert run_child(out, data, kill_on_append=(nth, True)) is None
        assert not path.read_bytes().endswith(b"\n")  # a torn last line is there
    assert run_child(out, data) == 0
    assert comparable(read_records(path)) == clean
    assert path.read_bytes().endswith(b"\n")
