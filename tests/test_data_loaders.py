"""load_dataset for every format: real samples (when ../shared/data exists), generated files,
bad input, the cache, and the MovieLens download path (with a local fake archive)."""

from __future__ import annotations

import hashlib
import io
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest

from embpress.data import CacheError, load_dataset
from embpress.data import cache as cache_mod
from embpress.data import movielens as movielens_mod
from embpress.data import registry as registry_mod
from embpress.data.schema import CTRDataset

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_file(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real sample {path} not present (the shared data folder ../shared/data is absent)")
    return path


def load(spec: str, tmp_path: Path, **kw) -> CTRDataset:
    return load_dataset(spec, cache_dir=tmp_path / "cache", progress=False, **kw)


def check_dataset(ds: CTRDataset) -> None:
    """Invariants every processed dataset keeps."""
    n_train = len(ds.train)
    for split in (ds.train, ds.valid, ds.test):
        assert split.sparse.dtype == np.int32 and split.dense.dtype == np.float32
        assert set(np.unique(split.label)) <= {0.0, 1.0}
        if len(split):
            assert (split.sparse >= 0).all()
            assert (split.sparse.max(0) < [f.num_embeddings for f in ds.fields]).all()
            assert np.isfinite(split.dense).all() and (split.dense >= 0).all()
    for f, field in enumerate(ds.fields):
        counts = field.counts
        assert counts.sum() == n_train  # every training row counted once, rare ones in the OOV row
        assert (np.diff(counts[:-1]) <= 0).all()  # id 0 most frequent; OOV is the last id
        np.testing.assert_array_equal(np.bincount(ds.train.sparse[:, f], minlength=len(counts)), counts)


def write_rows(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


CRITEO_ROW = "\t".join(["0", "1", "1", "5", "0", "1382", "4", "15", "2", "181", "1", "2", "", "2"]
                       + ["68fd1e64"] * 25 + [""])


# ---------------------------------------------------------------------------------------- real samples


def test_criteo_sample_and_chunking(tmp_path):
    path = shared_file("criteo-sample", "train.txt")
    ds = load(f"criteo:{path}", tmp_path)
    check_dataset(ds)
    assert (len(ds.train), len(ds.valid), len(ds.test)) == (800, 100, 100)
    assert len(ds.fields) == 26 and ds.num_dense == 13 and ds.info["min_count"] == 2
    assert all(f.num_embeddings > 1 for f in ds.fields)
    small = load(f"criteo:{path}", tmp_path / "small", chunk_rows=100)
    for a, b in zip((ds.train, ds.valid, ds.test), (small.train, small.valid, small.test), strict=True):
        np.testing.assert_array_equal(a.sparse, b.sparse)
        np.testing.assert_array_equal(a.dense, b.dense)
        np.testing.assert_array_equal(a.label, b.label)
    assert [f.counts.tolist() for f in ds.fields] == [f.counts.tolist() for f in small.fields]
    assert ds.vocab_bytes == small.vocab_bytes == 12 * sum(f.num_embeddings - 1 for f in ds.fields)


def test_avazu_sample(tmp_path):
    ds = load(f"avazu:{shared_file('avazu-sample', 'avazu_sample.txt')}", tmp_path)
    check_dataset(ds)
    names = [f.name for f in ds.fields]
    assert len(names) == 24 and names[0] == "hour" and names[-2:] == ["weekday", "weekend"]
    assert "id" not in names and "click" not in names and ds.num_dense == 0
    assert (len(ds.train), len(ds.valid), len(ds.test)) == (80, 10, 10)
    assert sum(f.num_embeddings > 1 for f in ds.fields) >= 10


def test_frappe(tmp_path):
    val = shared_file("frappe", "frappe.validation.libfm")
    test = shared_file("frappe", "frappe.test.libfm")
    ds = load(f"libfm:{val},{test}", tmp_path)
    check_dataset(ds)
    assert ds.name == "frappe" and len(ds.fields) == 10 and ds.num_dense == 0
    assert (len(ds.train), len(ds.valid), len(ds.test)) == (60_608, 17_316, 8_658)  # 7:2:1 of 86,582
    assert set(np.unique(ds.train.label)) == {0.0, 1.0}
    assert ds.info["split"] == [0.7, 0.2, 0.1]


# ------------------------------------------------------------------------------------ generated files


def test_criteo_fields_dense_and_missing_values(tmp_path):
    lines = [CRITEO_ROW] * 20
    lines[3] = "\t".join(["1", "-5", "", "7"] + ["0"] * 10 + ["aaaaaaaa"] + [""] * 25)
    lines[7] = "1\t3" + "\t" * 12 + "\tbbbbbbbb"  # trailing empty columns stripped (as in some copies)
    path = write_rows(tmp_path / "train.txt", lines)
    ds = load(f"criteo:{path}", tmp_path, min_count=1, seed=1)
    check_dataset(ds)
    assert [f.name for f in ds.fields][:2] == ["C1", "C2"] and ds.dense_names[0] == "I1"
    every = np.concatenate([ds.train.dense, ds.valid.dense, ds.test.dense])
    assert np.isclose(every[:, 2], np.log1p(5)).sum() == 18  # I3 == 5 except the two odd lines
    assert every.min() == 0.0  # -5 clipped, missing -> 0
    assert ds.fields[25].num_embeddings == 2  # C26 is always empty: '' is a value, plus OOV


def test_avazu_hour_fields(tmp_path):
    header = "id,click,hour,C1,site_id"
    lines = [header] + [f"{i},{i % 2},1410{d:02d}{h:02d},1005,s{i % 3}"
                        for i, (d, h) in enumerate((d, h) for d in (25, 26, 27) for h in (0, 13, 23))]
    ds = load(f"avazu:{write_rows(tmp_path / 'a.csv', lines)}", tmp_path, min_count=1)
    check_dataset(ds)
    assert [f.name for f in ds.fields] == ["hour", "C1", "site_id", "weekday", "weekend"]
    vocab = {f.name: cache_mod.read_vocab(Path(ds.info["cache"]), i).to_pylist() for i, f in enumerate(ds.fields)}
    assert sorted(vocab["hour"]) <= ["0", "13", "23"]
    assert set(vocab["weekday"]) <= {"5", "6", "0"}  # 2014-10-25 Sat, 26 Sun, 27 Mon
    assert set(vocab["weekend"]) <= {"0", "1"}


def write_movielens_100k(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    write_rows(folder / "u.data", ["1\t10\t5\t881250949", "2\t10\t3\t891717742", "1\t20\t4\t878887116",
                                   "3\t20\t1\t880606923", "2\t20\t4\t886397596"] * 4)
    write_rows(folder / "u.user", ["1|24|M|technician|85711", "2|53|F|other|94043", "3|17|M|writer|32067"])
    flags = ["0"] * 19
    action, comedy = list(flags), list(flags)
    action[1], comedy[5], comedy[8] = "1", "1", "1"
    (folder / "u.item").write_bytes("\n".join([
        "10|Richard III (1995)|22-Jan-1996||http://us.imdb.com/M/title-exact?Richard%20III%20(1995)|" + "|".join(action),
        "20|Célestine (1998)|01-Jan-1995||http://x|" + "|".join(comedy)]).encode("latin-1") + b"\n")
    return folder


def write_movielens_1m(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    write_rows(folder / "ratings.dat", ["1::1193::5::978300760", "1::661::3::978302109", "2::1193::4::978298413",
                                        "2::661::2::978299026"] * 3)
    write_rows(folder / "users.dat", ["1::F::1::10::48067", "2::M::56::16::70072-1234"])
    (folder / "movies.dat").write_bytes("1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n"
                                        "661::James and the Giant Peach (1996)::Animation|Children's|Musical\n"
                                        .encode("latin-1"))
    return folder


@pytest.mark.parametrize("variant", ["100k", "1m"])
def test_movielens(tmp_path, variant):
    folder = (write_movielens_100k if variant == "100k" else write_movielens_1m)(tmp_path / f"ml-{variant}")
    ds = load(f"movielens:{folder}", tmp_path)
    check_dataset(ds)
    assert ds.name == f"movielens-{variant}" and ds.num_dense == 0
    assert [f.name for f in ds.fields] == ["user", "item", "age", "gender", "occupation", "zip", "genre"]
    assert len(ds.train) + len(ds.valid) + len(ds.test) == (20 if variant == "100k" else 12)
    vocab = {f.name: cache_mod.read_vocab(Path(ds.info["cache"]), i).to_pylist() for i, f in enumerate(ds.fields)}
    if variant == "100k":
        assert set(vocab["age"]) <= {"18", "50", "1"} and set(vocab["genre"]) <= {"Action", "Comedy"}
        assert set(vocab["zip"]) <= {"857", "940", "320"}
    else:
        assert set(vocab["age"]) <= {"1", "56"} and set(vocab["genre"]) <= {"Drama", "Animation"}
        assert set(vocab["zip"]) <= {"480", "700"}
    labels = np.concatenate([ds.train.label, ds.valid.label, ds.test.label])
    assert labels.sum() == (12 if variant == "100k" else 6)  # ratings >= 4


def test_libfm_pools_files_and_maps_labels(tmp_path):
    a = write_rows(tmp_path / "toy.a.libfm", [f"{'-1' if i % 3 else '1'} {i % 4}:1 {10 + i % 2}:1 20:1"
                                               for i in range(30)])
    b = write_rows(tmp_path / "toy.b.libfm", [f"{i % 2} {i % 4}:1 {10 + i % 2}:1.0 21:1" for i in range(20)])
    ds = load(f"libfm:{a},{b}", tmp_path)
    check_dataset(ds)
    assert ds.name == "toy" and [f.name for f in ds.fields] == ["f1", "f2", "f3"]
    assert (len(ds.train), len(ds.valid), len(ds.test)) == (35, 10, 5)
    labels = np.concatenate([ds.train.label, ds.valid.label, ds.test.label])
    assert labels.sum() == 10 + 10


def _generated(fmt: str, tmp_path: Path) -> str:
    rng = np.random.default_rng(0)
    if fmt == "criteo":
        lines = [CRITEO_ROW.replace("\t1382\t", f"\t{rng.integers(0, 9)}\t").replace(
            "68fd1e64", f"{rng.integers(0, 6):08x}", 3) for _ in range(60)]
        return f"criteo:{write_rows(tmp_path / 'c.txt', lines)}"
    if fmt == "avazu":
        lines = ["id,click,hour,C1,site_id"] + [f"{i},{rng.integers(0, 2)},141021{rng.integers(0, 24):02d},"
                                               f"{rng.integers(0, 3)},s{rng.integers(0, 9)}" for i in range(60)]
        return f"avazu:{write_rows(tmp_path / 'a.csv', lines)}"
    if fmt == "libfm":
        lines = [f"{rng.choice([-1, 1])} {rng.integers(0, 7)}:1 {rng.integers(7, 30)}:1" for _ in range(60)]
        return f"libfm:{write_rows(tmp_path / 'x.libfm', lines[:25])},{write_rows(tmp_path / 'y.libfm', lines[25:])}"
    return f"movielens:{write_movielens_1m(tmp_path / 'ml')}"


@pytest.mark.parametrize("fmt", ["criteo", "avazu", "libfm", "movielens"])
def test_every_format_is_independent_of_chunk_rows(tmp_path, fmt):
    spec = _generated(fmt, tmp_path)
    a = load_dataset(spec, cache_dir=tmp_path / "a", progress=False, min_count=2)
    b = load_dataset(spec, cache_dir=tmp_path / "b", progress=False, min_count=2, chunk_rows=3)
    check_dataset(a)
    for x, y in zip((a.train, a.valid, a.test), (b.train, b.valid, b.test), strict=True):
        for name in ("dense", "sparse", "label"):
            np.testing.assert_array_equal(getattr(x, name), getattr(y, name))
    assert [f.counts.tolist() for f in a.fields] == [f.counts.tolist() for f in b.fields]


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("line, message", [
    ("x" + CRITEO_ROW[1:], r"train\.txt:2: label 'x': the label must be 0 or 1"),
    ("", r"train\.txt:2: empty line"),
    ("\t".join(CRITEO_ROW.split("\t")[:10]), r"train\.txt:2: expected 15 to 40 '\\t'-separated columns, got 10"),
    (CRITEO_ROW + "\textra", r"train\.txt:2: expected 15 to 40 .* got 41"),
    (CRITEO_ROW.replace("\t1382\t", "\tnan\t"), r"train\.txt:2: column I5: 'nan' is NaN or infinite"),
    (CRITEO_ROW.replace("\t1382\t", "\tabc\t"), r"train\.txt:2: column I5: 'abc' is not a number"),
    (CRITEO_ROW[:-14], r"train\.txt:2: column C24: '68fd' .*truncated"),
], ids=["label", "empty", "short", "long", "nan", "text", "cut"])
def test_criteo_bad_lines_name_file_and_line(tmp_path, line, message):
    path = write_rows(tmp_path / "train.txt", [CRITEO_ROW, line, CRITEO_ROW])
    with pytest.raises(ValueError, match=message):
        load(f"criteo:{path}", tmp_path)
    assert not any((tmp_path / "cache").glob("criteo-*")), "no cache folder after a failed build"
    assert not any((tmp_path / "cache").glob(".criteo-*")), "no temporary folder left behind"


@pytest.mark.parametrize("lines, message", [
    (["1 1:1 2:1", "1 1:1"], r"x\.libfm:2: expected 2 features"),
    (["1 1:1 2:1", "2 1:1 2:1"], r"x\.libfm:2: label '2' is not one of -1, 0, 1"),
    (["1 1:1 2:1", "yes 1:1 2:1"], r"x\.libfm:2: label 'yes'"),
    (["1 1:1 2:1", "1 1:1 2"], r"x\.libfm:2: bad feature '2': expected index:value"),
    (["1 1:1 2:1", "1 1:1 a:1"], r"x\.libfm:2: bad feature 'a:1'"),
    (["1 1:1 2:1", "1 1:1 2:x"], r"x\.libfm:2: bad feature '2:x': value is not a number"),
    (["1 1:1 2:1", "1 1:1 2:0.5"], r"x\.libfm:2: bad feature '2:0.5': only one-hot"),
    (["1 1:1 2:1", "", "1 1:1 2:1"], r"x\.libfm:2: empty line"),
], ids=["count", "label2", "label-text", "no-colon", "index", "value", "not-one", "empty"])
def test_libfm_bad_lines(tmp_path, lines, message):
    with pytest.raises(ValueError, match=message):
        load(f"libfm:{write_rows(tmp_path / 'x.libfm', lines)}", tmp_path)


def test_avazu_bad_input(tmp_path):
    good = "1,0,14102100,1005"
    cases = [
        (["id,click,hour,C1", good, "2,0,14102100"], r"a\.csv:3: expected 4 ','-separated columns, got 3"),
        (["id,click,hour,C1", good, "2,0,141021,1005"], r"a\.csv:3: hour '141021' is not a YYMMDDHH"),
        (["id,click,hour,C1", good, "2,0,14133100,1005"], r"a\.csv:3: hour '14133100'"),
        (["id,click,hour,C1", "2,yes,14102100,1005"], r"a\.csv:2: click 'yes'"),
        (["id,hour,C1", "1,14102100,1005"], r"a\.csv:1: avazu header lacks column\(s\) \['click'\]"),
        (["id,click,hour,C1,C1", "1,0,14102100,1,1"], r"a\.csv:1: duplicate column names"),
    ]
    for lines, message in cases:
        with pytest.raises(ValueError, match=message):
            load(f"avazu:{write_rows(tmp_path / 'a.csv', lines)}", tmp_path)


def test_movielens_bad_input(tmp_path):
    folder = write_movielens_1m(tmp_path / "ml")
    write_rows(folder / "ratings.dat", ["1::1193::5::978300760", "9::1193::5::978300760"])
    with pytest.raises(ValueError, match=r"ratings\.dat:2: user '9' is not in users\.dat"):
        load(f"movielens:{folder}", tmp_path)
    write_rows(folder / "ratings.dat", ["1::1193::5::978300760", "1::1193::5"])
    with pytest.raises(ValueError, match=r"ratings\.dat:2: expected 4 '::'-separated columns"):
        load(f"movielens:{folder}", tmp_path)
    write_rows(folder / "ratings.dat", ["1::1193::five::978300760"])
    with pytest.raises(ValueError, match=r"ratings\.dat:1: rating 'five' is not a number"):
        load(f"movielens:{folder}", tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no MovieLens ratings file"):
        load(f"movielens:{tmp_path / 'empty'}", tmp_path)
    with pytest.raises(FileNotFoundError, match="MovieLens folder not found"):
        load(f"movielens:{tmp_path / 'nowhere'}", tmp_path)


def test_missing_and_empty_files(tmp_path):
    for fmt in ("criteo", "avazu", "libfm"):
        with pytest.raises(FileNotFoundError, match="missing.txt"):
            load(f"{fmt}:{tmp_path / 'missing.txt'}", tmp_path)
        empty = tmp_path / f"empty-{fmt}.txt"
        empty.write_text("")
        with pytest.raises(ValueError, match=f"empty-{fmt}.txt: empty file"):
            load(f"{fmt}:{empty}", tmp_path)


# ------------------------------------------------------------------------------------------- specs


def test_spec_errors_list_the_choices(tmp_path):
    with pytest.raises(ValueError, match=r"unknown dataset format 'parquet'.*'avazu', 'criteo', 'libfm', "
                                         r"'movielens', 'recbole', 'synthetic'"):
        load_dataset("parquet:/x", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="criteo spec needs a file"):
        load_dataset("criteo", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="non-empty string"):
        load_dataset("  ", cache_dir=tmp_path)


def test_synthetic_spec_options():
    ds = load_dataset("synthetic:rows=300,num_fields=4,max_cardinality=100,seed=3", progress=False)
    assert len(ds.train) == 240 and len(ds.fields) == 4 and ds.info["seed"] == 3
    default_seed = load_dataset("synthetic:rows=300,num_fields=2", seed=7, progress=False)
    assert default_seed.info["seed"] == 7
    with pytest.raises(ValueError, match=r"synthetic option 'colour=red'.*'max_cardinality'.*'rows'"):
        load_dataset("synthetic:colour=red")
    with pytest.raises(ValueError, match=r"rows='many': expected an int"):
        load_dataset("synthetic:rows=many")
    with pytest.raises(ValueError, match="min_count does not apply"):
        load_dataset("synthetic:rows=300", min_count=3)


# ------------------------------------------------------------------------------------------- cache


def test_cache_hit_key_and_env(tmp_path, monkeypatch):
    path = write_rows(tmp_path / "train.txt", [CRITEO_ROW] * 300)
    first = load(f"criteo:{path}", tmp_path)
    folder = Path(first.info["cache"])
    assert folder.parent == tmp_path / "cache" and isinstance(first.train.sparse, np.memmap)

    def boom(*a, **k):
        raise AssertionError("rebuilt although cached")

    with monkeypatch.context() as m:
        m.setattr(registry_mod, "preprocess", boom)
        again = load(f"criteo:{path}", tmp_path)
    assert again.info["cache"] == str(folder)
    assert load(f"criteo:{path}", tmp_path, seed=1).info["cache"] != str(folder)
    assert load(f"criteo:{path}", tmp_path, min_count=1).info["cache"] != str(folder)
    write_rows(path, [CRITEO_ROW] * 301)  # new content -> new key
    assert load(f"criteo:{path}", tmp_path).info["cache"] != str(folder)
    monkeypatch.setenv("EMBPRESS_CACHE", str(tmp_path / "env-cache"))
    ds = load_dataset(f"criteo:{path}", progress=False)
    assert Path(ds.info["cache"]).parent == tmp_path / "env-cache"


@pytest.mark.parametrize("damage", ["truncate", "delete", "meta", "flip"])
def test_damaged_cache_is_detected_and_rebuilt(tmp_path, damage):
    path = write_rows(tmp_path / "train.txt", [CRITEO_ROW] * 300)
    ds = load(f"criteo:{path}", tmp_path)
    folder = Path(ds.info["cache"])
    reference = np.array(ds.train.sparse)
    del ds
    target = folder / ("meta.json" if damage == "meta" else "train.sparse.npy")
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:-100])
    elif damage == "delete":
        target.unlink()
    elif damage == "flip":  # same size, one bit of one id changed: only the checksum sees it
        data = bytearray(target.read_bytes())
        data[-3] ^= 1
        target.write_bytes(bytes(data))
    else:
        target.write_text("{not json")
    with pytest.raises(CacheError, match=str(folder)):
        cache_mod.read_dataset(folder)
    if damage == "flip":
        with pytest.raises(CacheError, match="train.sparse.npy: damaged"):
            cache_mod.read_dataset(folder)
    with pytest.warns(RuntimeWarning, match=f"rebuilding a damaged dataset cache: {folder}"):
        rebuilt = load(f"criteo:{path}", tmp_path)
    np.testing.assert_array_equal(rebuilt.train.sparse, reference)
    assert [p.name for p in (tmp_path / "cache").iterdir() if p.is_dir()] == [folder.name]


def test_interrupted_build_leaves_nothing(tmp_path, monkeypatch):
    path = write_rows(tmp_path / "train.txt", [CRITEO_ROW] * 50)
    real = registry_mod.preprocess

    def interrupted(source, folder, **kw):
        real(source, folder, **kw)
        assert any(folder.iterdir())
        raise KeyboardInterrupt

    monkeypatch.setattr(registry_mod, "preprocess", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load(f"criteo:{path}", tmp_path)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["file-hashes.json"]
    # a leftover of a killed build (dead pid) is swept by the next build of the same key
    monkeypatch.setattr(registry_mod, "preprocess", real)
    monkeypatch.setattr(cache_mod, "_pid_alive", lambda pid: pid != 999999999)
    folder = Path(load(f"criteo:{path}", tmp_path).info["cache"])
    stale_for_key = tmp_path / "cache" / f".{folder.name}.tmp-999999999-x"
    stale_for_key.mkdir()
    cache_mod.discard(folder)
    load(f"criteo:{path}", tmp_path)
    assert not stale_for_key.exists()


def test_file_hash_memo(tmp_path):
    path = write_rows(tmp_path / "f.txt", ["abc"])
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert cache_mod.file_sha256(path, memo_dir=tmp_path) == digest
    assert (tmp_path / "file-hashes.json").exists()
    assert cache_mod.file_sha256(path, memo_dir=tmp_path) == digest
    path.write_text("abd\n")
    assert cache_mod.file_sha256(path, memo_dir=tmp_path) == hashlib.sha256(b"abd\n").hexdigest()


def test_progress_bars_do_not_break_loading(tmp_path, capsys):
    path = write_rows(tmp_path / "train.txt", [CRITEO_ROW] * 10)
    ds = load_dataset(f"criteo:{path}", cache_dir=tmp_path / "cache", progress=True)
    assert len(ds.train) == 8
    assert capsys.readouterr().out == ""  # bars go to stderr


# ----------------------------------------------------------------------------------- movielens download


def fake_zip(variant: str, source: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for f in sorted(source.iterdir()):
            zf.write(f, f"ml-{variant}/{f.name}")
    return buf.getvalue()


def test_download_movielens_verifies_checksum_and_extracts_atomically(tmp_path, monkeypatch):
    archive = fake_zip("100k", write_movielens_100k(tmp_path / "src"))
    fetched = []

    def fetch(url, dest, *, progress):
        fetched.append(url)
        Path(dest).write_bytes(archive)

    monkeypatch.setattr(movielens_mod, "_fetch", fetch)
    dest = tmp_path / "downloads"
    with pytest.raises(ValueError, match="checksum mismatch .*ml-100k.zip: md5 .* expected 0e33842e"):
        movielens_mod.download_movielens("100k", dest, progress=False)
    assert fetched == ["https://files.grouplens.org/datasets/movielens/ml-100k.zip"]
    assert list(dest.iterdir()) == [], "nothing left after a failed download"

    md5 = hashlib.md5(archive).hexdigest()
    monkeypatch.setitem(movielens_mod.MOVIELENS_DOWNLOADS, "100k", (fetched[0], md5))
    folder = movielens_mod.download_movielens("100k", dest, progress=False)
    assert folder == dest / "ml-100k" and (folder / "u.data").is_file()
    assert [p.name for p in dest.iterdir()] == ["ml-100k"]
    assert movielens_mod.download_movielens("100k", dest, progress=False) == folder
    assert len(fetched) == 2, "an extracted folder is reused"
    ds = load("movielens:100k", tmp_path)  # no folder named 100k: downloads into <cache>/downloads
    assert ds.name == "movielens-100k" and len(fetched) == 3
    assert Path(ds.info["sources"][0]["path"]).parent == tmp_path / "cache" / "downloads" / "ml-100k"
    with pytest.raises(ValueError, match=r"variant '10m' not in \['100k', '1m'\]"):
        movielens_mod.download_movielens("10m", dest)
    assert os.listdir(dest) == ["ml-100k"]


def test_cache_byte_flip_drill_detects_every_flip(tmp_path):
    """One random byte of one file of a cached dataset changed, 60 times over every file: always a CacheError."""
    path = write_rows(tmp_path / "train.txt", [CRITEO_ROW] * 300)
    folder = Path(load(f"criteo:{path}", tmp_path).info["cache"])
    files = sorted(p for p in folder.iterdir() if p.is_file())
    assert {"meta.json", "meta.json.crc32", "vocab.arrow"} <= {p.name for p in files}
    intact = {p: p.read_bytes() for p in files}
    rng = np.random.default_rng(0)
    detected = 0
    for trial in range(60):
        target = files[trial % len(files)]
        data = bytearray(intact[target])
        data[int(rng.integers(len(data)))] ^= int(rng.integers(1, 256))
        target.write_bytes(bytes(data))
        try:
            cache_mod.read_dataset(folder)
        except CacheError:
            detected += 1
        target.write_bytes(intact[target])
    assert detected == 60
    cache_mod.read_dataset(folder)  # intact again
