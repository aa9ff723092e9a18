"""Property tests (hypothesis): whatever the input, each failure is a named exception that says
where and what, never a crash, a hang or a wrong answer.

Classes: ids (values, dtypes, shapes, lists), vectors with NaN/inf and odd shapes, empty inputs,
malformed spec strings (dataset, table, codec, budget, CLI lists), and malformed lines of every file
format embpress reads (Criteo, Avazu, libFM, MovieLens, BEIR corpus/queries/qrels, .npy/.fvecs
vectors, results.jsonl records).
"""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from embpress.bench.ctr import parse_list
from embpress.bench.records import RecordError, append_record, make_record, read_records, trial_id
from embpress.data import load_dataset
from embpress.data.registry import check_spec
from embpress.tables import BudgetError, Field, build_table, registered_tables
from embpress.tables.base import parse_budget
from embpress.vectors.beir import read_corpus, read_qrels, read_queries
from embpress.vectors.codec import as_matrix, build_codec, code_size
from embpress.vectors.vecio import read_vectors

FAST = settings(max_examples=60, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=25, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])

# ----------------------------------------------------------------------------------------- ids

FIELDS = [Field("a", 7), Field("b", 40)]
ID_TABLES = {m: build_table(m, fields=FIELDS, dim=4, budget=None if m == "full" else 600)
             for m in ("full", "hash", "qr", "tt")}


@FAST
@given(method=st.sampled_from(sorted(ID_TABLES)),
       dtype=st.sampled_from(["int64", "int32", "uint8", "int16", "float32", "bool", "float64"]),
       lead=st.lists(st.integers(0, 3), max_size=2), width=st.integers(0, 3), data=st.data())
def test_ids_are_looked_up_or_refused_by_name(method, dtype, lead, width, data):
    table = ID_TABLES[method]
    shape = (*lead, width)
    values = np.array(data.draw(st.lists(st.integers(-3, 45), min_size=int(np.prod(shape)),
                                         max_size=int(np.prod(shape)))), dtype=np.int64).reshape(shape)
    ids = torch.from_numpy(values.astype(dtype)) if dtype != "bool" else torch.from_numpy(values > 0)
    integer = dtype in ("int64", "int32", "uint8", "int16")
    as_typed = ids.long() if integer else None
    in_range = integer and width == 2 and bool(((as_typed >= 0) & (as_typed < torch.tensor([7, 40]))).all())
    if in_range:
        out = table(ids)
        assert out.shape == (*lead, 2, 4) and torch.isfinite(out).all()
    else:
        with pytest.raises((TypeError, ValueError)) as e:
            table(ids)
        assert any(w in str(e.value) for w in ("integer tensor", "shape [..., F]", "out of range"))


@FAST
@given(ids=st.one_of(st.lists(st.integers(0, 6), min_size=1, max_size=4).map(lambda x: [x[:2] or [0, 0]]),
                     st.integers(0, 6), st.text(max_size=3)))
def test_ids_that_are_not_tensors_say_how_to_convert(ids):
    with pytest.raises(TypeError, match=r"torch.as_tensor\(ids\)"):
        ID_TABLES["hash"](np.asarray(ids) if isinstance(ids, list) else ids)


# ----------------------------------------------------------------------------------------- vectors


@FAST
@given(n=st.integers(0, 6), d=st.integers(0, 5), bad=st.sampled_from([np.nan, np.inf, -np.inf, None]),
       pos=st.integers(0, 100), ndim=st.sampled_from([1, 2, 3]))
def test_vectors_with_nan_inf_or_odd_shapes_are_refused(n, d, bad, pos, ndim):
    x = np.random.default_rng(pos).standard_normal((n, d)).astype(np.float32)
    if bad is not None and x.size:
        x.flat[pos % x.size] = bad
    x = x.reshape(-1) if ndim == 1 else (x[None] if ndim == 3 else x)
    if ndim == 2 and (bad is None or x.size == 0):
        assert as_matrix(x).shape == (n, d)
        return
    with pytest.raises(ValueError, match="2-D|NaN or inf"):
        as_matrix(x)


SQ8 = build_codec("sq8").fit(np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32))


@FAST
@given(rows=st.integers(0, 4), d=st.sampled_from([8, 7, 9]), bad=st.sampled_from([None, np.nan, np.inf]),
       dtype=st.sampled_from(["float32", "float64", "int32", "complex64", "U1"]))
def test_codec_input_is_checked(rows, d, bad, dtype):
    x = np.ones((rows, d))
    if bad is not None and x.size:
        x[0, 0] = bad
    if dtype in ("int32", "U1") and bad is not None:
        return  # NaN has no integer or string form
    x = x.astype(dtype)
    ok = d == 8 and (bad is None or rows == 0) and dtype in ("float32", "float64", "int32")
    if ok:
        assert SQ8.encode(x).shape == (rows, SQ8.code_bytes)
    else:
        with pytest.raises((ValueError, TypeError)):
            SQ8.encode(x)


def test_empty_inputs_are_refused_by_the_benchmarks(tmp_path):
    from embpress.bench.vectors import EvalSet, run_eval

    x = np.ones((5, 4), dtype=np.float32)
    for base, queries, match in ((x[:0], x, "base .* is empty"), (x, x[:0], "no queries")):
        with pytest.raises(ValueError, match=match):
            run_eval(EvalSet("e", base, queries), ["sq8"], tmp_path, k=2, progress=False)
    with pytest.raises(ValueError, match="empty codec spec"):
        run_eval(EvalSet("e", x, x), ["sq8", " "], tmp_path, k=2, progress=False)
    assert not (tmp_path / "results.jsonl").exists()


# ----------------------------------------------------------------------------------------- spec strings

SPEC_TEXT = st.one_of(
    st.text(max_size=30),
    st.builds(lambda a, b: f"{a}:{b}", st.sampled_from(["synthetic", "criteo", "avazu", "libfm", "movielens", "x"]),
              st.text(alphabet="rows=,seed1x0:/.ab", max_size=20)),
)


@FAST
@given(spec=SPEC_TEXT)
def test_dataset_specs_pass_or_fail_by_name(spec):
    try:
        check_spec(spec)
    except (ValueError, FileNotFoundError) as e:
        assert str(e)
    except PermissionError as e:  # a spec naming a protected path: still an OSError with the path
        assert e.filename


@FAST
@given(spec=st.one_of(st.text(max_size=20),
                      st.builds(lambda m, s: m + s, st.sampled_from(registered_tables()),
                                st.sampled_from(["", "+int8", "+int16", "+", "+int4", "++int8", "+hash"]))),
       budget=st.one_of(st.none(), st.integers(-10, 5000), st.sampled_from(["10x", "0.5x", "x", "1e3x", "abc"])))
def test_table_specs_and_budgets_pass_or_fail_by_name(spec, budget):
    try:
        b = parse_budget(budget)
    except (ValueError, TypeError) as e:
        assert "budget" in str(e)
        return
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            table = build_table(spec, fields=FIELDS, dim=4, budget=b)
    except BudgetError as e:
        assert str(e)
        return
    except ValueError as e:
        assert spec.split("+")[0] in str(e) or any(w in str(e) for w in ("unknown table method", "not understood",
                                                                       "quantization suffix")), str(e)
        return
    assert table.serving_bytes() > 0


@FAST
@given(spec=st.one_of(st.text(max_size=16),
                      st.builds(lambda a, n, b: f"{a}{n}{b}",
                                st.sampled_from(["pq", "opq", "rq", "sq", "pca", "mrl", "bebr", "itq", "rbin", "bin",
                                                 "fp", "pca4+", "sq8+"]),
                                st.sampled_from(["", "0", "1", "4", "8", "16", "99999", "-1", "x4", "x"]),
                                st.sampled_from(["", "x4", "x8", "x0", "+sq8", "d8", "+"]))),
       d=st.integers(1, 16))
def test_codec_specs_pass_or_fail_by_name(spec, d):
    try:
        size = code_size(d, spec)
    except ValueError as e:
        assert "spec" in str(e) or "d=" in str(e)
        return
    assert size > 0


@FAST
@given(text=st.text(max_size=20), kind=st.sampled_from([int, float, str]))
def test_cli_lists_parse_or_fail_naming_the_option(text, kind):
    try:
        out = parse_list(text, kind, "ratios")
    except ValueError as e:
        assert str(e).startswith("--ratios: ")
        return
    assert len(out) == len(text.split(",")) and all(isinstance(v, kind) for v in out)


# ----------------------------------------------------------------------------------------- results.jsonl

JSON = st.recursive(st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True)
                    | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                    max_leaves=10)


@FAST
@given(config=st.dictionaries(st.text(max_size=6), JSON, max_size=5), metrics=st.dictionaries(st.text(max_size=6), JSON,
                                                                                              max_size=4))
def test_records_round_trip_and_identity_is_the_whole_config(config, metrics):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "results.jsonl"
        rec = make_record("vectors", config, status="ok", metrics=metrics)
        append_record(path, rec)
        (back,) = read_records(path, kind="vectors")
        assert back == rec and back["trial"] == trial_id(back["config"])
        for k in config:  # every setting is part of the identity
            changed = {**back["config"], k: ["changed", back["config"][k]]}
            assert trial_id(changed) != back["trial"]


@FAST
@given(line=st.one_of(st.binary(max_size=60), st.text(max_size=60), JSON.map(json.dumps)),
       where=st.integers(0, 2))
def test_a_line_that_is_not_an_intact_record_names_its_line(line, where):
    raw = line.encode("utf-8", "surrogatepass") if isinstance(line, str) else line
    raw = raw.replace(b"\n", b" ")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "results.jsonl"
        for seed in (0, 1):
            append_record(path, make_record("ctr", {"seed": seed}, status="ok"))
        lines = path.read_bytes().split(b"\n")[:-1]
        lines.insert(where, raw)
        path.write_bytes(b"\n".join(lines) + b"\n")
        if not raw.strip():
            assert len(read_records(path)) == 2  # blank lines are allowed
            return
        with pytest.raises(RecordError, match=rf"results.jsonl:{where + 1}: "):
            read_records(path)


@FAST
@given(key=st.sampled_from(["layout", "kind", "trial", "config", "status", "reason", "metrics", "provenance",
                            "check", "extra"]),
       value=JSON, drop=st.booleans())
def test_an_edited_record_is_refused(key, value, drop):
    rec = make_record("ctr", {"seed": 0, "dim": 4}, status="ok", metrics={"auc": 0.7})
    edited = dict(rec)
    if drop and key in edited:
        del edited[key]
    else:
        edited[key] = value
    assume(edited != rec)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "results.jsonl"
        path.write_text(json.dumps(edited) + "\n")
        with pytest.raises(RecordError, match="results.jsonl:1: "):
            read_records(path)


@FAST
@given(cut=st.integers(1, 200))
def test_a_torn_last_line_is_skipped_then_cut_off(cut):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "results.jsonl"
        first = make_record("ctr", {"seed": 0}, status="ok")
        append_record(path, first)
        line = json.dumps(make_record("ctr", {"seed": 1}, status="ok"), sort_keys=True).encode()
        assume(cut < len(line))
        with open(path, "ab") as fh:
            fh.write(line[:cut])
        with pytest.warns(UserWarning, match="torn"):
            assert read_records(path) == [first]
        with pytest.warns(UserWarning, match="torn"):
            append_record(path, make_record("ctr", {"seed": 2}, status="ok"))
        assert [r["config"]["seed"] for r in read_records(path)] == [0, 2]


# ----------------------------------------------------------------------------------------- data file formats

CRITEO = "\t".join(["1", "3", "", "0"] + ["2"] * 10 + ["68fd1e64"] * 26)
BAD_CRITEO = st.one_of(
    st.text(alphabet="2-x.a ", min_size=1, max_size=3).map(lambda t: CRITEO.replace("1", t, 1)),  # label
    st.text(alphabet="abc-", min_size=1, max_size=4).map(lambda t: CRITEO.replace("\t3\t", f"\t{t}\t", 1)),  # int
    st.text(alphabet="0123456789abcdef", max_size=12).filter(lambda t: len(t) not in (0, 8))
    .map(lambda t: CRITEO.rsplit("\t", 1)[0] + "\t" + t),  # hex
    st.integers(1, 5).map(lambda k: CRITEO + "\tx" * k),  # too many columns
    st.integers(2, 14).map(lambda k: "\t".join(CRITEO.split("\t")[:k])),  # too few
    st.just(""),
)


def _assert_line_error(fmt: str, name: str, lines: list[str], line: int, **kw) -> None:
    """Write ``lines`` to file ``name``, load it as ``fmt``: a ValueError must name ``name:line``."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / name).write_text("\n".join(lines) + "\n")
        with pytest.raises(ValueError) as e:
            load_dataset(f"{fmt}:{tmp / name}", cache_dir=tmp / "cache", progress=False, min_count=1, **kw)
        assert f"{name}:{line}: " in str(e.value), str(e.value)


@SLOW
@given(bad=BAD_CRITEO, where=st.integers(0, 39), chunk=st.sampled_from([7, 1000]))
def test_criteo_malformed_line_is_named(bad, where, chunk):
    lines = [CRITEO] * 40
    lines[where] = bad
    _assert_line_error("criteo", "c.txt", lines, where + 1, chunk_rows=chunk)


AVAZU_HEADER = "id,click,hour,C1,site_id"
AVAZU = "7,1,14102123,1005,1fbe01fe"
BAD_AVAZU = st.one_of(
    st.text(alphabet="2x-. ", min_size=1, max_size=3).map(lambda t: AVAZU.replace(",1,", f",{t},", 1)),
    st.text(alphabet="0123456789x", max_size=10).filter(lambda t: not (len(t) == 8 and t.isdigit()))
    .map(lambda t: AVAZU.replace("14102123", t)),
    st.integers(1, 3).map(lambda k: AVAZU + ",z" * k),
    st.integers(1, 4).map(lambda k: ",".join(AVAZU.split(",")[:k])),
    st.just(""),
)


@SLOW
@given(bad=BAD_AVAZU, where=st.integers(0, 29))
def test_avazu_malformed_line_is_named(bad, where):
    lines = [AVAZU_HEADER] + [AVAZU] * 30
    lines[where + 1] = bad
    _assert_line_error("avazu", "a.csv", lines, where + 2)


LIBFM = "1 3:1 17:1"
BAD_LIBFM = st.one_of(
    st.text(alphabet="2x. ", min_size=1, max_size=2).filter(str.strip).map(lambda t: LIBFM.replace("1 ", f"{t} ", 1)),
    st.text(alphabet="ab:-", min_size=1, max_size=4).map(lambda t: LIBFM.replace("3:1", t)),
    st.sampled_from(["0", "2", "0.5", "x", "1e9"]).map(lambda v: LIBFM.replace("3:1", f"3:{v}")),
    st.integers(1, 3).map(lambda k: LIBFM + " 9:1" * k),
    st.just("1 3:1"),
    st.just(""),
)


@SLOW
@given(bad=BAD_LIBFM, where=st.integers(1, 29))
def test_libfm_malformed_line_is_named(bad, where):
    lines = [LIBFM] * 30
    lines[where] = bad
    _assert_line_error("libfm", "x.libfm", lines, where + 1)


ML_RATING = "1\t10\t5\t881250949"
BAD_ML = st.one_of(
    st.sampled_from(["x", "", "5.5.5", "nan?"]).map(lambda v: f"1\t10\t{v}\t881250949"),
    st.sampled_from(["99", "", "u1"]).map(lambda u: f"{u}\t10\t5\t881250949"),
    st.sampled_from(["77", "i"]).map(lambda i: f"1\t{i}\t5\t881250949"),
    st.integers(1, 3).map(lambda k: "\t".join(ML_RATING.split("\t")[:k])),
    st.just(ML_RATING + "\t7"),
    st.just(""),
)


@SLOW
@given(bad=BAD_ML, where=st.integers(0, 19))
def test_movielens_malformed_line_is_named(bad, where):
    lines = [ML_RATING, "2\t10\t3\t891717742", "1\t20\t4\t878887116", "2\t20\t4\t886397596"] * 5
    lines[where] = bad
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "ml"
        folder.mkdir()
        (folder / "u.data").write_text("\n".join(lines) + "\n")
        (folder / "u.user").write_text("1|24|M|technician|85711\n2|53|F|other|94043\n")
        flags = "|".join(["0"] * 19)
        (folder / "u.item").write_text(f"10|A (1995)|22-Jan-1996||http://x|{flags}\n"
                                       f"20|B (1998)|01-Jan-1995||http://x|{flags}\n")
        with pytest.raises(ValueError, match=rf"u.data:{where + 1}: "):
            load_dataset(f"movielens:{folder}", cache_dir=Path(tmp) / "cache", progress=False)


CORPUS = '{"_id": "d1", "title": "", "text": "x"}'
BAD_JSONL = st.one_of(
    st.text(max_size=20).filter(lambda t: t.strip() and not t.strip().startswith("{")),
    st.sampled_from(['{"_id": "d9"}', '{"text": "x"}', '{"_id": ["d"], "text": "x"}', '{"_id": "d9", "text": 3.5}',
                     '[1]', '"s"', '{"_id": "d0", "text": "dup"}', '{"_id": "d9", "text": "x"']),
)


@FAST
@given(bad=BAD_JSONL, where=st.integers(1, 9), reader=st.sampled_from(["corpus", "queries"]))
def test_beir_jsonl_malformed_line_is_named(bad, where, reader):
    lines = [CORPUS.replace("d1", f"d{i}") for i in range(10)]
    lines[where] = bad
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{reader}.jsonl"
        path.write_text("\n".join(lines) + "\n")
        try:
            (read_corpus if reader == "corpus" else read_queries)(path)
        except ValueError as e:
            assert f"{reader}.jsonl:{where + 1}: " in str(e), str(e)
        else:
            pytest.fail(f"line {bad!r} was accepted")


@FAST
@given(raw=st.binary(min_size=1, max_size=8).filter(lambda b: b"\n" not in b), where=st.integers(1, 4))
def test_beir_jsonl_bytes_that_are_not_utf8_name_the_line(raw, where):
    try:
        raw.decode("utf-8")
        assume(False)
    except UnicodeDecodeError:
        pass
    lines = [CORPUS.replace("d1", f"d{i}").encode() for i in range(5)]
    lines[where] = b'{"_id": "x", "text": "' + raw + b'"}'
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "corpus.jsonl"
        path.write_bytes(b"\n".join(lines) + b"\n")
        with pytest.raises(ValueError, match=rf"corpus.jsonl:{where + 1}: "):
            read_corpus(path)


@FAST
@given(bad=st.one_of(st.sampled_from(["q1\td1", "q1\td1\t1\t1\t1", "q1\td1\tx", "q1\td1\t1.5", "\td1\t1", "q1"]),
                     st.text(alphabet="ab\t", min_size=1, max_size=6).filter(lambda t: t.count("\t") not in (2, 3))),
       where=st.integers(2, 6))
def test_qrels_malformed_line_is_named(bad, where):
    assume(bad.strip())
    lines = ["query-id\tcorpus-id\tscore"] + [f"q{i}\td{i}\t1" for i in range(6)]
    lines[where] = bad
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "test.tsv"
        path.write_text("\n".join(lines) + "\n")
        with pytest.raises(ValueError, match=rf"test.tsv:{where + 1}: "):
            read_qrels(path)


@FAST
@given(cut=st.integers(0, 300), flip=st.integers(0, 300), kind=st.sampled_from(["npy", "fvecs"]))
def test_vector_files_cut_or_damaged_are_refused_or_read_whole(cut, flip, kind):
    x = np.arange(40, dtype=np.float32).reshape(5, 8)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"v.{kind}"
        if kind == "npy":
            np.save(path, x)
        else:
            np.hstack([np.full((5, 1), 8, dtype="<i4").view("<f4"), x]).tofile(path)
        raw = bytearray(path.read_bytes())
        raw = raw[:len(raw) - cut % len(raw)]
        if raw and flip % 2:
            raw[flip % len(raw)] ^= 0xFF
        path.write_bytes(bytes(raw))
        try:
            y = read_vectors(path, mmap=False)
        except ValueError as e:
            assert "v." + kind in str(e)
            return
        # what is read back is a whole 2-D array of the right width or shape (a flipped float byte
        # changes a value, which only a checksum could catch; vector files carry none)
        assert y.ndim == 2 and (y.shape[1] == 8 or kind == "npy")


# ----------------------------------------------------------------------------------------- report grouping


@FAST
@given(trials=st.lists(st.tuples(st.sampled_from(["hash", "qr"]), st.sampled_from([4, 16]), st.sampled_from([1e-3, 3e-3]),
                                 st.integers(0, 2), st.floats(0.5, 0.9)), min_size=1, max_size=12))
def test_report_rows_are_whole_configurations_with_each_seed_once(trials):
    from embpress.bench.report import aggregate

    recs = [make_record("ctr", {"dataset": "d", "model": "dlrm", "method": m, "ratio": 10.0, "dim": dim, "lr": lr,
                                "seed": seed}, status="ok",
                        metrics={"auc": auc, "logloss": 0.5, "serving_bytes": 10, "achieved_ratio": 10.0})
            for m, dim, lr, seed, auc in trials]
    rows = aggregate(recs)
    want: dict[tuple, dict[int, float]] = {}
    for m, dim, lr, seed, auc in trials:  # the latest record of a trial counts, once
        want.setdefault((m, dim, lr), {})[seed] = auc
    got = {(r.method, r.config["dim"], r.config["lr"]): dict(zip(r.seeds, r.aucs, strict=True)) for r in rows}
    assert got == want and len(got) == len(rows)
    assert all(len(r.seeds) == len(set(r.seeds)) for r in rows)  # never one seed twice
