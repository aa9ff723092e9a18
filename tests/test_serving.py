"""The serving artifact: every method, after all of its stages, served from its file alone."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch

from embpress import serving
from embpress.models import build_model
from embpress.tables import Field, Ratio, build_table, registered_tables, table_class
from embpress.tables.base import (
    SPEC_SHAPES,
    spec_arrays,
    spec_bytes,
    spec_from_arrays,
    spec_schema,
    state_nbytes,
)
from embpress.train import TrainConfig, train

QUANTIZED = ["hash+int8", "qr+int8", "unified+int16", "robe+int8"]
RATIO = {"int8": 1.95, "int16": 1.3, "int8-qat": 3.9, "int16-qat": 1.9}
HPARAMS = {"dhe": {"num_hash": 64}}  # 1024 int32 hash pairs alone (8 KB) exceed these tiny budgets


def _served_base(method: str) -> str:
    return "quantized" if "+" in method else method


def _trained(method, data):
    torch.manual_seed(0)
    budget = None if "+" not in method and table_class(method).reference else Ratio(RATIO.get(method, 4.0))
    table = build_table(method, fields=data.fields, dim=8, budget=budget, **HPARAMS.get(method, {}))
    model = build_model("dlrm", table=table, num_dense=data.num_dense, bottom=(16,), top=(16,))
    train(model, data, TrainConfig(epochs=1, batch_size=256, max_steps_per_epoch=4, evals_per_epoch=1,
                                   progress=False))
    return model.eval(), table


def _header_len(path) -> int:
    with open(path, "rb") as fh:
        return struct.unpack("<Q", fh.read(8))[0]


@pytest.mark.parametrize("method", registered_tables() + QUANTIZED)
def test_artifact_after_all_stages(method, tiny_ctr, tmp_path):
    model, table = _trained(method, tiny_ctr)
    path = tmp_path / f"{method}.safetensors"
    table.save_serving(path)
    state = table.serving_state()
    # the file is the serving bytes plus the safetensors header, nothing else
    assert table.serving_bytes() == state_nbytes(state)
    assert path.stat().st_size == table.serving_bytes() + 8 + _header_len(path)
    if "+" in method or not table_class(method).reference:
        assert table.serving_bytes() <= table.max_bytes
    assert _served_base(method) in serving.served_methods()
    served = serving.load(path)
    assert served.serving_bytes() == table.serving_bytes()
    # the metadata is counted: the spec's values and the arrays' shapes are stored as arrays, and the
    # loader reads them back
    spec = table.serving_spec()
    arrays = table.serving_arrays()
    ndims = sum(a.ndim for a in arrays.values())
    assert table.array_ndims() == ndims
    assert table.serving_bytes() == table.array_bytes() + spec_bytes(spec) + 8 * ndims
    assert state[SPEC_SHAPES].tolist() == [d for k in sorted(arrays) for d in arrays[k].shape]
    assert served.spec == json.loads(json.dumps(spec))
    assert not list(served.parameters()), "a served table holds buffers only"
    ids = torch.from_numpy(np.asarray(tiny_ctr.test.sparse[:512], dtype=np.int64))
    with torch.no_grad():
        expected = table(ids)
        got = served(ids)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("method", registered_tables() + QUANTIZED)
def test_dlrm_exports_with_a_served_table(method, tiny_ctr, tmp_path):
    """Every served lookup is free of data-dependent shapes: the DLRM around it exports with a
    dynamic batch, and the exported program equals the trained model in eval mode."""
    model, table = _trained(method, tiny_ctr)
    table.save_serving(tmp_path / "t.safetensors")
    batches = tiny_ctr.test.batches(64)
    dense, ids, _ = next(batches)
    dense2, ids2, _ = next(batches)
    with torch.no_grad():
        expected, expected2 = model(dense, ids), model(dense2[:37], ids2[:37])
    model.table = serving.load(tmp_path / "t.safetensors")
    batch = torch.export.Dim.AUTO
    exported = torch.export.export(model, (dense, ids), dynamic_shapes=({0: batch}, {0: batch})).module()
    with torch.no_grad():
        torch.testing.assert_close(exported(dense, ids), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(exported(dense2[:37], ids2[:37]), expected2, rtol=1e-5, atol=1e-6)


@pytest.fixture
def artifact(tmp_path):
    t = build_table("hash", fields=[Field("a", 1000), Field("b", 7)], dim=4, budget=Ratio(4))
    path = tmp_path / "a.safetensors"
    t.save_serving(path)
    return t, path


def test_damaged_artifacts_raise_naming_the_file(artifact, tmp_path):
    _, path = artifact
    data = path.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[:-5])
    with pytest.raises(ValueError, match="truncated.safetensors.*truncated"):
        serving.load(truncated)
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(data[:3])
    with pytest.raises(ValueError, match="tiny.safetensors"):
        serving.load(tiny)
    flipped = tmp_path / "flipped.safetensors"
    flipped.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(ValueError, match="flipped.safetensors fails its CRC-32"):
        serving.load(flipped)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(struct.pack("<Q", 4) + b"{}{}" + b"0" * 10)
    with pytest.raises(ValueError, match="junk.safetensors has no embpress header"):
        serving.load(junk)
    with pytest.raises(FileNotFoundError, match="missing"):
        serving.load(tmp_path / "missing.safetensors")


def test_header_names_method_fields_and_spec(artifact):
    t, path = artifact
    hlen = _header_len(path)
    with open(path, "rb") as fh:
        fh.seek(8)
        meta = json.loads(json.loads(fh.read(hlen))["__metadata__"]["embpress"])
    assert meta["method"] == "hash" and meta["dim"] == 4 and meta["fields"] == [["a", 1000], ["b", 7]]
    assert meta["serving_bytes"] == t.serving_bytes() and isinstance(meta["crc32"], int)
    assert "spec" not in meta and "spec_schema" in meta  # the spec's values live in counted arrays


def test_metadata_is_stored_as_arrays_and_counted():
    spec = {"bits": 4, "mode": "mult", "scale": 0.25, "flag": True, "none": None,
            "num_high": {"user": 30, "item": 7}, "shape": [[100, 8], "wé"]}
    arrays = spec_arrays(spec)
    assert arrays["meta/ints"].dtype == np.int64 and arrays["meta/text"].dtype == np.uint8
    # one int64 word per number and per string (its length), plus the strings' UTF-8 bytes
    assert spec_bytes(spec) == 8 * 9 + len("mult") + len("wé".encode()) == state_nbytes(arrays)
    assert spec_from_arrays(spec_schema(spec), arrays["meta/ints"], arrays["meta/text"]) == spec
    assert spec_bytes({}) == 0 and spec_arrays({}) == {}
    with pytest.raises(TypeError, match=r"spec\.bad has type set"):
        spec_bytes({"bad": {1}})
    # a table with a spec counts it: Q-R's operation is 8 + 4 bytes beyond its arrays, and the arrays'
    # shapes one word per dimension: weight_r, weight_q, weight_full [rows, 4] and moduli [2]
    t = build_table("qr", fields=[Field("a", 1000), Field("b", 7)], dim=4, budget=Ratio(4))
    assert t.serving_bytes() == t.array_bytes() + 12 + 8 * 7 == state_nbytes(t.serving_state())
    assert set(t.serving_state()) - set(t.serving_arrays()) == {"meta/ints", "meta/text", "meta/shapes"}
    assert t.serving_state()["meta/shapes"].tolist() == [d for k in sorted(t.serving_arrays())
                                                          for d in t.serving_arrays()[k].shape]


def test_failed_write_leaves_no_file(tmp_path, monkeypatch):
    t = build_table("hash", fields=[Field("a", 1000)], dim=4, budget=Ratio(4))
    monkeypatch.setattr(type(t), "serving_bytes", lambda self: 1)
    with pytest.raises(ValueError, match="refusing to write"):
        t.save_serving(tmp_path / "x.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_qr_artifact_is_a_hundredth_of_the_table(tmp_path):
    fields = [Field("big", 2_000_000), Field("mid", 40_000), Field("small", 30)]
    t = build_table("qr", fields=fields, dim=16, budget=Ratio(100))
    t.save_serving(tmp_path / "qr.safetensors")
    size = (tmp_path / "qr.safetensors").stat().st_size
    assert size <= t.full_bytes / 100 + 8 + _header_len(tmp_path / "qr.safetensors")
    assert np.isclose(size, t.serving_bytes(), rtol=0.01)


def test_stored_shapes_must_match_the_arrays():
    """``meta/shapes`` lists each array's dimensions in name order; a mismatch is named at load."""
    from embpress.tables.base import check_shapes, shape_arrays

    arrays = {"w": np.zeros((3, 4), np.float32), "b": np.zeros(5, np.float32)}
    stored = {**arrays, **shape_arrays(arrays)}
    assert stored[SPEC_SHAPES].tolist() == [5, 3, 4]
    check_shapes(stored, "x")  # consistent: no error
    stored[SPEC_SHAPES] = np.array([5, 4, 3], dtype=np.int64)
    with pytest.raises(ValueError, match=r"x: meta/shapes lists \[5, 4, 3\] but the arrays' shapes are \[5, 3, 4\]"):
        check_shapes(stored, "x")
    with pytest.raises(ValueError, match="meta/shapes lists"):
        check_shapes(arrays, "y")  # missing altogether
