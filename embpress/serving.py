"""Serve a trained table from its serving artifact alone: the ``serving_state()`` arrays on disk.

``table.save_serving(path)`` (:func:`save`) writes exactly the arrays of ``serving_state()`` at
their stored precision into a safetensors file (no pickle, memory-mappable) whose metadata holds
a small JSON header: format version, method spec, fields (name, ids), dim, the structure of the
method's serving spec (the few settings its lookup needs beyond its arrays, e.g. Q-R's
``operation``: their values are stored as the ``meta/*`` arrays and counted in ``serving_bytes()``,
see :func:`embpress.tables.base.spec_arrays`) and a CRC-32 of the array bytes. The arrays' shapes
are stored too, as ``meta/shapes`` (one int64 per dimension, counted in ``serving_bytes()``; the
loader checks them against the container's). The file is ``serving_bytes()`` plus the safetensors
header.

:func:`load` rebuilds an inference-only ``nn.Module`` from those arrays: it holds them as buffers
(no parameters, no optimizer state, no supernet, no training class) and its lookups equal the
trained table's eval-mode lookups. Methods stored as integer codes (``METHOD+int8``) are
dequantized once at load.

>>> import tempfile, torch
>>> from embpress.tables import Field, Ratio, build_table
>>> t = build_table("hash", fields=[Field("user", 10_000), Field("c", 5)], dim=8, budget=Ratio(10)).eval()
>>> path = tempfile.mkdtemp() + "/hash.safetensors"
>>> t.save_serving(path)
>>> served = load(path)
>>> ids = torch.tensor([[9_999, 4], [3, 0]])
>>> torch.equal(served(ids), t(ids)), served.serving_bytes() == t.serving_bytes()
(True, True)
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

FORMAT = "embpress-serving"
VERSION = 3
READS = (1, 2, 3)
"""Versions :func:`read` accepts: 1 kept the serving spec in the header, 2 keeps its values in arrays,
3 adds ``meta/shapes`` (the arrays' shapes, counted in ``serving_bytes()``), checked at load."""
_META_KEY = "embpress"
_CRC_CHUNK = 1 << 26


# ----------------------------------------------------------------------------- file format


def _crc(arrays: dict[str, np.ndarray]) -> int:
    """CRC-32 over every array's bytes in name order (names and shapes are in the header)."""
    crc = 0
    for name in sorted(arrays):
        flat = np.ascontiguousarray(arrays[name]).reshape(-1).view(np.uint8)
        for start in range(0, flat.size, _CRC_CHUNK):
            crc = zlib.crc32(flat[start:start + _CRC_CHUNK], crc)
    return crc


def save(table: Any, path: str | os.PathLike) -> None:
    """Write ``table.serving_state()`` and its header to ``path`` atomically (temporary file, rename).

    Raises ValueError when the arrays' bytes differ from ``table.serving_bytes()``: the artifact
    must be exactly what the table reports.
    """
    from safetensors.numpy import save_file

    from embpress import __version__
    from embpress.tables.base import spec_schema

    path = Path(path)
    state = {k: np.ascontiguousarray(v) for k, v in table.serving_state().items()}
    nbytes = int(sum(v.nbytes for v in state.values()))
    if nbytes != table.serving_bytes():
        raise ValueError(f"{table.method}: serving_state() holds {nbytes:,} bytes but serving_bytes() "
                         f"reports {table.serving_bytes():,}; refusing to write {path}")
    header = {
        "format": FORMAT, "version": VERSION, "embpress_version": __version__,
        "method": table.method, "dim": table.dim,
        "fields": [[f.name, int(f.num_embeddings)] for f in table.fields],
        "spec_schema": spec_schema(table.serving_spec()), "serving_bytes": nbytes, "crc32": _crc(state),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(state, tmp, metadata={_META_KEY: json.dumps(header)})
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(header, arrays)`` of a serving artifact (arrays as tensors, read once, no further copy),
    checked: structure, sizes and CRC-32.

    Raises FileNotFoundError for a missing file and ValueError naming the file for anything
    malformed, truncated or damaged.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"serving artifact {path} does not exist")
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ValueError(f"serving artifact {path} is truncated ({size} bytes): not a safetensors file")
        hlen = struct.unpack("<Q", head)[0]
        if hlen > size - 8:
            raise ValueError(f"serving artifact {path} is truncated: its header claims {hlen:,} bytes, "
                             f"the file has {size:,}")
        try:
            raw = json.loads(fh.read(hlen))
            header = json.loads(raw["__metadata__"][_META_KEY])
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"serving artifact {path} has no embpress header: not written by "
                             f"save_serving") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError(f"serving artifact {path}: header format is not {FORMAT!r}")
    if header.get("version") not in READS:
        raise ValueError(f"serving artifact {path} has format version {header.get('version')!r}; this "
                         f"embpress reads versions {list(READS)}")
    expected = 8 + hlen + int(header.get("serving_bytes", -1))
    if size != expected:
        raise ValueError(f"serving artifact {path} is {size:,} bytes but its header describes {expected:,}: "
                         f"truncated or padded")
    try:
        arrays = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"serving artifact {path} is malformed: {e}") from None
    if _crc({k: v.numpy() for k, v in arrays.items()}) != header.get("crc32"):
        raise ValueError(f"serving artifact {path} fails its CRC-32 check: the array bytes are damaged")
    return header, arrays


def load(path: str | os.PathLike) -> ServedTable:
    """An inference-only table served from the artifact at ``path`` (see the module docstring)."""
    from embpress.tables.base import SPEC_INTS, SPEC_TEXT, check_shapes, spec_from_arrays

    header, arrays = read(path)
    method = header["method"]
    if int(header.get("version", 1)) >= 3:
        check_shapes(arrays, f"serving artifact {path}")
    cls = served_class(method)
    try:
        if "spec_schema" in header:
            spec = spec_from_arrays(header["spec_schema"], arrays.get(SPEC_INTS), arrays.get(SPEC_TEXT))
        else:  # version 1
            spec = header.get("spec") or {}
        return cls(fields=[(str(n), int(s)) for n, s in header["fields"]], dim=int(header["dim"]),
                   arrays=arrays, spec=spec, method=method)
    except (KeyError, IndexError, TypeError, StopIteration, UnicodeDecodeError) as e:
        raise ValueError(f"serving artifact {path}: arrays do not match method {method!r} ({e!r})") from None


# ----------------------------------------------------------------------------- served tables

_SERVED: dict[str, type[ServedTable]] = {}


def register_served(*names: str) -> Callable[[type[ServedTable]], type[ServedTable]]:
    """Class decorator: serve the artifacts of the table methods ``names``."""

    def deco(cls: type[ServedTable]) -> type[ServedTable]:
        for name in names:
            if name in _SERVED and _SERVED[name] is not cls:
                raise ValueError(f"served method {name!r} is registered twice")
            _SERVED[name] = cls
        return cls

    return deco


def served_methods() -> list[str]:
    """Method names (without ``+int8``/``+int16``) that :func:`load` can serve."""
    return sorted(_SERVED)


def served_class(method: str) -> type[ServedTable]:
    base = "quantized" if "+" in method else method
    if base not in _SERVED:
        raise ValueError(f"no served lookup for method {method!r} in this embpress version; served: "
                         f"{served_methods()}")
    return _SERVED[base]


class ServedTable(nn.Module):
    """Base of the inference-only tables: arrays as buffers, ids ``[..., F]`` -> ``[..., F, D]``."""

    needs: ClassVar[tuple[str, ...]] = ()

    def __init__(self, *, fields: Sequence[tuple[str, int]], dim: int, arrays: dict[str, torch.Tensor],
                 spec: dict[str, Any], method: str) -> None:
        super().__init__()
        missing = [k for k in self.needs if k not in arrays]
        if missing:
            raise KeyError(f"missing arrays {missing}")
        self.method = method
        self.field_names = [n for n, _ in fields]
        self.dim = dim
        self.num_fields = len(fields)
        self.spec = dict(spec)
        sizes = torch.tensor([s for _, s in fields], dtype=torch.long)
        offsets = torch.zeros_like(sizes)
        offsets[1:] = torch.cumsum(sizes, 0)[:-1]
        self.register_buffer("_sizes", sizes, persistent=False)
        self.register_buffer("_offsets", offsets, persistent=False)
        self._names = sorted(arrays)
        for name, arr in arrays.items():
            self.register_buffer(_buffer_name(name), arr)
        self.setup()

    def array(self, name: str) -> torch.Tensor:
        return getattr(self, _buffer_name(name))

    def setup(self) -> None:
        """Derive index helpers from the arrays (subclass hook)."""

    def serving_bytes(self) -> int:
        """Bytes of the served arrays as stored in the artifact."""
        return int(sum(self.array(n).numel() * self.array(n).element_size() for n in self._names))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.dim() == 0 or ids.shape[-1] != self.num_fields:
            raise ValueError(f"ids must have shape [..., F] with F={self.num_fields} fields, got {tuple(ids.shape)}")
        if ids.is_floating_point():
            raise TypeError(f"ids must be an integer tensor, got dtype {ids.dtype}")
        lead = ids.shape[:-1]
        flat = ids.reshape(-1, self.num_fields).long()
        return self._lookup(flat).reshape(*lead, self.num_fields, self.dim)

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


def _buffer_name(name: str) -> str:
    return "a_" + name.replace(".", "__").replace("/", "___")


def _universal_hash(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, m: torch.Tensor | int) -> torch.Tensor:
    from embpress.tables.hashing import universal_hash

    return universal_hash(x, a, b, m)


@register_served("full")
class FullServed(ServedTable):
    """One fp32 row per id of every field."""

    needs = ("weight",)

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(ids + self._offsets, self.array("weight"))


@register_served("noid")
class NoIdServed(ServedTable):
    """One vector per field, whatever the id."""

    needs = ("weight",)

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        return self.array("weight").expand(ids.shape[0], -1, -1)


@register_served("hash")
class HashServed(ServedTable):
    """Per field, ``h_f(id) mod m_f`` into the shared rows (small fields unhashed)."""

    needs = ("weight", "hash_a", "hash_b", "buckets")

    def setup(self) -> None:
        buckets = self.array("buckets")
        offsets = torch.zeros_like(buckets)
        offsets[1:] = torch.cumsum(buckets, 0)[:-1]
        self.register_buffer("_row_offsets", offsets, persistent=False)
        self.register_buffer("_hashed", buckets < self._sizes, persistent=False)

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        h = _universal_hash(ids, self.array("hash_a"), self.array("hash_b"), self.array("buckets"))
        rows = torch.where(self._hashed, h, ids) + self._row_offsets
        return nn.functional.embedding(rows, self.array("weight"))


@register_served("unified")
class UnifiedServed(ServedTable):
    """One shared table of ``D / c`` wide rows, ``c`` salted hashes per (field, id), concatenated."""

    needs = ("weight", "hash_a", "hash_b", "buckets")

    def setup(self) -> None:
        self.buckets = int(self.array("buckets")[0])

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        rows = _universal_hash(ids.unsqueeze(-1), self.array("hash_a"), self.array("hash_b"), self.buckets)
        return nn.functional.embedding(rows, self.array("weight")).flatten(-2)


@register_served("robe")
class RobeServed(ServedTable):
    """Blocks of one circular array read at hashed offsets, with hashed signs."""

    needs = ("array", "offset_a", "offset_b")

    def setup(self) -> None:
        from embpress.tables.hashing import PRIME

        self.prime = PRIME
        self.blocks = self.array("offset_a").shape[1]
        self.block_len = self.dim // self.blocks
        self.array_size = self.array("array").numel()
        self.signs = "sign_a" in self._names
        self.register_buffer("_within", torch.arange(self.block_len), persistent=False)
        byte_signs = 2.0 * ((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1) - 1
        self.register_buffer("_byte_signs", byte_signs, persistent=False)

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        x = ids.unsqueeze(-1)
        start = _universal_hash(x, self.array("offset_a"), self.array("offset_b"), self.array_size)
        pos = ((start.unsqueeze(-1) + self._within) % self.array_size).flatten(-2)          # [N, F, D]
        out = self.array("array")[pos]
        if not self.signs:
            return out
        words = _universal_hash(x, self.array("sign_a"), self.array("sign_b"), self.prime)
        low = torch.stack([words & 255, (words >> 8) & 255], -1)
        return out * nn.functional.embedding(low, self._byte_signs).flatten(-3)[..., : self.dim]


@register_served("qr")
class QRServed(ServedTable):
    """Q-R with any number of complementary partitions per field, from ``moduli`` or ``radices``."""

    def setup(self) -> None:
        from embpress.tables.qr import _part_dims

        self.operation = self.spec["operation"]
        sizes = self._sizes.tolist()
        if "radices" in self._names:
            radices = [tuple(int(r) for r in row if r) for row in self.array("radices").tolist()]
        else:
            radices = [(-(-n // int(m)), int(m)) if m else () for n, m in zip(sizes, self.array("moduli").tolist(),
                                                                           strict=True)]
        # per field: (tables, row offsets, strides, radices) for each digit, leading digit first
        self.plan: list[tuple[list[str], list[int], list[int], list[int]]] = []
        used: dict[str, int] = {}
        for f, rad in enumerate(radices):
            k = len(rad)
            if k == 0:
                names = ["weight_full"]
                rad = (sizes[f],)
            elif k == 2:
                names = ["weight_q", "weight_r"]
            else:
                names = [f"weight_p{k}_{j}" for j in range(k)]
            offs = []
            for name, r in zip(names, rad, strict=True):
                offs.append(used.get(name, 0))
                used[name] = used.get(name, 0) + r
            strides = [int(np.prod(rad[j + 1:])) for j in range(len(rad))]
            self.plan.append((names, offs, strides, list(rad)))
        self.widths = {k: _part_dims(self.dim, k, self.operation)[::-1] for k in {len(p[0]) for p in self.plan}}

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        out = []
        for f, (names, offs, strides, rad) in enumerate(self.plan):
            x = ids[:, f].contiguous()
            vecs = []
            for j, (name, off) in enumerate(zip(names, offs, strict=True)):
                digit = torch.div(x, strides[j], rounding_mode="floor")
                if j > 0:
                    digit = torch.remainder(digit, rad[j])
                vecs.append(nn.functional.embedding(digit + off, self.array(name)))
            vecs = vecs[::-1]                                   # remainder first, as the table combines
            if self.operation == "concat" or len(vecs) == 1:
                v = torch.cat(vecs, -1)
            else:
                v = vecs[0]
                for w in vecs[1:]:
                    v = v * w if self.operation == "mult" else v + w
            out.append(v)
        return torch.stack(out, 1)


@register_served("quantized", "int8", "int16")
class QuantizedServed(ServedTable):
    """``METHOD+int8``/``+int16``: the stored codes dequantized once at load, then ``METHOD``'s lookup."""

    def __init__(self, *, fields: Sequence[tuple[str, int]], dim: int, arrays: dict[str, torch.Tensor],
                 spec: dict[str, Any], method: str) -> None:
        super().__init__(fields=fields, dim=dim, arrays=arrays, spec=spec, method=method)
        inner_arrays = {k: v for k, v in arrays.items()
                        if not k.endswith((".codes", ".scale", ".offset")) and not k.startswith("meta/")}
        # quantized parameters (param_of: serving array -> parameter) or quantized serving arrays
        rebuild = spec["param_of"] if "param_of" in spec else {k: [k, shape] for k, shape in spec["arrays"].items()}
        for inner_name, (param, shape) in rebuild.items():
            codes = arrays[f"{param}.codes"]
            w = codes.float() * arrays[f"{param}.scale"][:, None] + arrays[f"{param}.offset"][:, None]
            inner_arrays[inner_name] = w.reshape(shape)
        self.inner = served_class(spec["inner"])(fields=fields, dim=dim, arrays=inner_arrays,
                                                 spec=spec["inner_spec"], method=spec["inner"])

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        return self.inner._lookup(ids)


@register_served("tt")
class TTServed(ServedTable):
    """TT cores per decomposed field (``NAME.core{k}``), plain rows (``NAME.weight``) for the rest."""

    def setup(self) -> None:
        self.kinds = ["tt" if f"{n}.core0" in self._names else "plain" for n in self.field_names]
        self.num_cores = sum(1 for n in self._names if n.startswith(f"{self._first_tt()}.core"))
        self.id_shape = {n: [int(self.array(f"{n}.core{k}").shape[1]) for k in range(self.num_cores)]
                         for n, kind in zip(self.field_names, self.kinds, strict=True) if kind == "tt"}

    def _first_tt(self) -> str:
        return next((n for n in self.field_names if f"{n}.core0" in self._names), "")

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        out = []
        for j, (name, kind) in enumerate(zip(self.field_names, self.kinds, strict=True)):
            x = ids[:, j].contiguous()
            if kind == "plain":
                out.append(nn.functional.embedding(x, self.array(f"{name}.weight")))
                continue
            shape = self.id_shape[name]
            stride = int(np.prod(shape[1:]))
            core = self.array(f"{name}.core0")                          # [1, n_0, d_0, R]
            left = core[0].index_select(0, torch.div(x, stride, rounding_mode="floor") % shape[0])
            for k in range(1, self.num_cores):
                stride //= shape[k]
                core = self.array(f"{name}.core{k}")                    # [R, n_k, d_k, R_k]
                digit = torch.div(x, stride, rounding_mode="floor") % shape[k]
                sel = core.index_select(1, digit).permute(1, 0, 2, 3)   # [N, R, d_k, R_k]
                left = torch.einsum("nwr,nrds->nwds", left, sel).flatten(1, 2)
            out.append(left.reshape(-1, self.dim))
        return torch.stack(out, 1)


@register_served("dhash")
class DoubleHashServed(ServedTable):
    """Frequent ids (``id < k_f``) own rows; the others read two hashed rows (sum or concat)."""

    needs = ("frequent_weight", "hashed_weight", "hash_a", "hash_b", "num_frequent", "hashed_rows")

    def setup(self) -> None:
        freq = self.array("num_frequent")
        hashed = self.array("hashed_rows")
        self.register_buffer("_freq_offsets", torch.cumsum(freq, 0) - freq, persistent=False)
        self.register_buffer("_hashed_offsets", torch.cumsum(hashed, 0) - hashed, persistent=False)
        self.register_buffer("_buckets", hashed.clamp(min=1), persistent=False)
        self.combine = "sum" if self.array("hashed_weight").shape[1] == self.dim else "concat"

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        is_frequent = ids < self.array("num_frequent")
        rare = ~is_frequent
        field = rare.nonzero()[:, 1]
        h = _universal_hash(ids[rare].unsqueeze(-1), self.array("hash_a")[field], self.array("hash_b")[field],
                            self._buckets[field].unsqueeze(-1))
        pair = nn.functional.embedding(h + self._hashed_offsets[field].unsqueeze(-1), self.array("hashed_weight"))
        rare_vec = pair.sum(1) if self.combine == "sum" else pair.flatten(1)
        frequent_vec = nn.functional.embedding((ids + self._freq_offsets)[is_frequent], self.array("frequent_weight"))
        out = rare_vec.new_zeros(*ids.shape, self.dim)
        return out.index_put((is_frequent,), frequent_vec).index_put((rare,), rare_vec)


@register_served("adapt")
class AdaptServed(ServedTable):
    """Exclusive rows for promoted ids (found by binary search in ``promoted_ids``), hashed shared rows else."""

    needs = ("exclusive_weight", "promoted_ids", "shared_weight", "num_promoted", "shared_rows", "hash_a", "hash_b")

    def setup(self) -> None:
        shared = self.array("shared_rows")
        promoted = self.array("num_promoted")
        sizes = self._sizes
        excl = torch.where(shared > 0, promoted, sizes)                 # exclusive rows per field
        self.register_buffer("_excl_offsets", torch.cumsum(excl, 0) - excl, persistent=False)
        self.register_buffer("_shared_offsets", torch.cumsum(shared, 0) - shared, persistent=False)
        self.register_buffer("_buckets", shared.clamp(min=1), persistent=False)
        hashed = (shared > 0).long()
        self._hashed = hashed.bool().tolist()
        # where each hashed field's promoted ids start in ``promoted_ids``
        starts = torch.cumsum(promoted * hashed, 0) - promoted * hashed
        self._promoted_slices = [(int(starts[f]), int(promoted[f])) for f in range(self.num_fields)]

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        out = []
        table, shared_w = self.array("exclusive_weight"), self.array("shared_weight")
        for f in range(self.num_fields):
            x = ids[:, f].contiguous()
            if not self._hashed[f]:
                out.append(nn.functional.embedding(x + self._excl_offsets[f], table))
                continue
            start, n = self._promoted_slices[f]
            promoted = self.array("promoted_ids")[start:start + n].long()
            pos = torch.searchsorted(promoted, x).clamp(max=max(n - 1, 0))
            hit = promoted[pos] == x if n else torch.zeros_like(x, dtype=torch.bool)
            h = _universal_hash(x, self.array("hash_a")[f], self.array("hash_b")[f], self._buckets[f])
            vec = nn.functional.embedding(h + self._shared_offsets[f], shared_w)
            if n:
                vec = torch.where(hit.unsqueeze(1), nn.functional.embedding(pos + self._excl_offsets[f], table), vec)
            out.append(vec)
        return torch.stack(out, 1)


@register_served("dedup")
class DedupServed(ServedTable):
    """Unique blocks of rows and the block remap."""

    needs = ("blocks", "remap")

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        r = int(self.spec["block_rows"])
        g = ids + self._offsets
        blk = torch.div(g, r, rounding_mode="floor")
        return nn.functional.embedding(self.array("remap")[blk].long() * r + (g - blk * r), self.array("blocks"))


@register_served("mde")
class MDEServed(ServedTable):
    """Per (field, frequency block) rows at their own dim, projected to D where narrower."""

    needs = ("inner_bounds",)

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        # every block is read for every id (clamped) and the id's own block selected: no
        # data-dependent shapes, so the lookup exports (torch.export)
        inner = self.array("inner_bounds").long()
        bounds = inner.tolist()
        out = []
        for j, name in enumerate(self.field_names):
            x = ids[:, j].contiguous()
            blk = torch.bucketize(x, inner[j], right=True)
            vec = torch.zeros(x.shape[0], self.dim)
            for k, lo in enumerate([0, *bounds[j]]):
                weight = self.array(f"{name}.block{k}.weight")
                if weight.shape[0] == 0:
                    continue
                rows = nn.functional.embedding((x - lo).clamp(0, weight.shape[0] - 1), weight)
                if f"{name}.block{k}.proj" in self._names:
                    rows = rows @ self.array(f"{name}.block{k}.proj")
                vec = torch.where((blk == k).unsqueeze(1), rows, vec)
            out.append(vec)
        return torch.stack(out, 1)


@register_served("int8-qat", "int16-qat")
class QATServed(ServedTable):
    """Integer codes with one scale per field (symmetric) or a scale and offset per row."""

    needs = ("codes", "scale")

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        g = ids + self._offsets
        codes = nn.functional.embedding(g, self.array("codes")).float()
        if "offset" in self._names:
            return codes * self.array("scale")[g].unsqueeze(-1) + self.array("offset")[g].unsqueeze(-1)
        return codes * self.array("scale")[None, :, None]


def _gather_bits(packed: torch.Tensor, index: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes ``index`` (int64, any shape) of a little-endian stream of ``bits``-bit codes (uint8 bytes)."""
    pos = index * bits
    first, shift = pos >> 3, pos & 7
    n = packed.numel()
    value = torch.zeros_like(index)
    if n == 0:
        return value
    for j in range((bits + 14) // 8):                                   # bytes covering shift + bits
        b = first + j
        byte = packed[b.clamp(max=max(n - 1, 0))].long() * (b < n)
        value |= byte << (8 * j)
    return (value >> shift) & ((1 << bits) - 1)


def _code_bits(choices: int) -> int:
    from embpress.tables.mgqe import code_bits

    return code_bits(choices)


@register_served("dhe-shared")
class SharedDHEServed(ServedTable):
    """Dense hash encoding, then the decoder's Linear layers (BatchNorm folded) with Mish between them."""

    needs = ("hash_a", "hash_b", "weight0", "bias0")

    def setup(self) -> None:
        self.layers = sum(1 for n in self._names if n.startswith("weight"))

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        from embpress.tables.dhe import dhe_encode

        flat = (ids + self._offsets).reshape(-1)
        uniq, inverse = torch.unique(flat, return_inverse=True)
        x = dhe_encode(uniq, self.array("hash_a"), self.array("hash_b"), int(self.spec["num_buckets"]),
                       self.spec["distribution"])
        for i in range(self.layers):
            x = nn.functional.linear(x, self.array(f"weight{i}"), self.array(f"bias{i}"))
            if i < self.layers - 1:
                x = nn.functional.mish(x)
        return x[inverse]


@register_served("dhe")
class DHEServed(ServedTable):
    """Per field with a network: the dense hash encoding of the id, then that field's Linear layers
    (BatchNorm folded) with Mish between them; the other fields read their plain ``rows``."""

    def setup(self) -> None:
        self.networks = [j for j in range(self.num_fields) if f"net{j}/weight0" in self._names]
        self.depth = sum(1 for n in self._names if n.startswith("net") and "/weight" in n) // max(1, len(self.networks))
        self.plain = [j for j in range(self.num_fields) if j not in self.networks]
        sizes = self._sizes[self.plain]
        self.register_buffer("_plain_offsets", torch.cumsum(sizes, 0) - sizes, persistent=False)

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        from embpress.tables.dhe import dhe_encode

        cols: list[torch.Tensor | None] = [None] * self.num_fields
        if self.plain:
            rows = nn.functional.embedding(ids[:, self.plain] + self._plain_offsets, self.array("rows"))
            for i, j in enumerate(self.plain):
                cols[j] = rows[:, i]
        for j in self.networks:
            uniq, inverse = torch.unique(ids[:, j], return_inverse=True)
            x = dhe_encode(uniq, self.array("hash_a").long(), self.array("hash_b").long(),
                           int(self.spec["num_buckets"]), self.spec["distribution"])
            for i in range(self.depth):
                x = nn.functional.linear(x, self.array(f"net{j}/weight{i}"), self.array(f"net{j}/bias{i}"))
                if i < self.depth - 1:
                    x = nn.functional.mish(x)
            cols[j] = x[inverse]
        return torch.stack(cols, 1)


@register_served("alpt")
class ALPTServed(ServedTable):
    """``bits``-bit codes (stored with offset ``2**(bits-1)``) times a step size per row."""

    needs = ("codes", "step")

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        bits = int(self.spec["bits"])
        g = ids + self._offsets                                                  # [N, F]
        idx = g.unsqueeze(-1) * self.dim + torch.arange(self.dim)
        codes = _gather_bits(self.array("codes"), idx, bits) - 2 ** (bits - 1)
        return codes.float() * self.array("step")[g].unsqueeze(-1)


@register_served("dpq")
class DPQServed(ServedTable):
    """``P`` packed codes per id into ``P`` codebooks of ``K`` vectors of ``D / P``."""

    needs = ("codes", "codebook")

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        book = self.array("codebook")
        p, k, pd = book.shape
        g = ids + self._offsets
        codes = _gather_bits(self.array("codes"), g.unsqueeze(-1) * p + torch.arange(p), _code_bits(k))
        return nn.functional.embedding(codes + torch.arange(p) * k, book.reshape(p * k, pd)).flatten(-2)


@register_served("mgqe")
class MGQEServed(ServedTable):
    """Per quantized field: codes of frequent ids into all centroids, of the others into the first few."""

    def setup(self) -> None:
        self.register_buffer("_popcount", _POPCOUNT8.clone(), persistent=False)

    def _high_rank(self, name: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Whether ids ``x`` are frequent, and their row among the frequent (or the rare) ids, from the
        stored bitmap words and the rank per word (no per-id index is built)."""
        words = self.array(f"{name}/high_mask").view(torch.int64)[x >> 6]
        high = ((words >> (x & 63)) & 1).bool()
        below = words & ((torch.ones_like(x) << (x & 63)) - 1)
        before = self.array(f"{name}/high_rank").long()[x >> 6] + \
            self._popcount[below.unsqueeze(-1).contiguous().view(torch.uint8).long()].sum(-1)
        return high, torch.where(high, before, x - before)

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        out = []
        p = int(self.spec["parts"])
        for j, name in enumerate(self.field_names):
            x = ids[:, j]
            if f"{name}/rows" in self._names:
                out.append(nn.functional.embedding(x, self.array(f"{name}/rows")))
                continue
            if f"{name}/high_mask" in self._names:
                high, rank = self._high_rank(name, x)
            else:
                n_high = int(self.spec["num_high"][name])
                high, rank = x < n_high, torch.where(x < n_high, x, x - n_high)
            idx = rank.unsqueeze(-1) * p + torch.arange(p)
            codes = torch.where(high.unsqueeze(-1),
                                _gather_bits(self.array(f"{name}/codes_high"), idx, int(self.spec["high_bits"])),
                                _gather_bits(self.array(f"{name}/codes_low"), idx, int(self.spec["low_bits"])))
            book = self.array(f"{name}/codebook")
            _, k, pd = book.shape
            out.append(nn.functional.embedding(codes + torch.arange(p) * k, book.reshape(p * k, pd)).flatten(-2))
        return torch.stack(out, 1)


@register_served("pep", "deeplight", "magprune", "autosrh")
class CSRServed(ServedTable):
    """Pruned rows in CSR form: a pointer per 64 rows plus the lengths of the rows before it in its group."""

    needs = ("values", "indices", "row_len", "group_ptr")

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        from embpress.tables.sparse_storage import ROW_GROUP

        r = (ids + self._offsets).reshape(-1)
        row_len = self.array("row_len").long()
        first = r - r % ROW_GROUP
        before = first.unsqueeze(1) + torch.arange(ROW_GROUP)                    # [M, 64]
        lens = row_len[before.clamp(max=row_len.numel() - 1)] * (before < r.unsqueeze(1))
        lo = self.array("group_ptr").long()[r // ROW_GROUP] + lens.sum(1)
        j = torch.arange(self.dim)
        at = lo.unsqueeze(1) + j                                                  # [M, D]
        valid = j < row_len[r].unsqueeze(1)
        values, indices = self.array("values"), self.array("indices").long()
        if values.numel() == 0:
            return values.new_zeros(*ids.shape, self.dim)
        at = at.clamp(max=values.numel() - 1)
        cols = torch.where(valid, indices[at], self.dim)                          # a dummy column past D
        out = values.new_zeros(r.numel(), self.dim + 1).scatter_(1, cols, values[at] * valid)
        return out[:, : self.dim].reshape(*ids.shape, self.dim)


@register_served("autosrh-cols")
class BlockColumnsServed(ServedTable):
    """Frequency blocks, each storing only its kept columns for every id of every field in it."""

    needs = ("bounds", "col_ptr", "cols")

    def setup(self) -> None:
        bounds = self.array("bounds").long()                                     # [F, B + 1]
        sizes = bounds[:, 1:] - bounds[:, :-1]
        self.register_buffer("_base", torch.cumsum(sizes, 0) - sizes, persistent=False)   # [F, B]
        self.num_blocks = bounds.shape[1] - 1

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        bounds = self.array("bounds").long()
        col_ptr = self.array("col_ptr").long().tolist()
        cols = self.array("cols").long()
        out = torch.zeros(*ids.shape, self.dim)
        for b in range(self.num_blocks):
            values = self.array(f"values/{b}")
            if values.numel() == 0:
                continue
            inside = ((ids >= bounds[:, b]) & (ids < bounds[:, b + 1])).unsqueeze(-1)
            rows = (self._base[:, b] + ids - bounds[:, b]).clamp(0, values.shape[0] - 1)
            kept = cols[col_ptr[b]:col_ptr[b + 1]]
            block = torch.zeros(*ids.shape, self.dim).index_copy(-1, kept, values[rows])
            out = torch.where(inside, block, out)
        return out


@register_served("dnis")
class DNISServed(ServedTable):
    """Row blocks of global ids (``block_end``), each storing its kept dims (``kept`` bits) in ``values``."""

    needs = ("values", "kept", "block_end")

    def setup(self) -> None:
        ends = self.array("block_end").long()
        num_blocks = ends.numel()
        kept = np.unpackbits(self.array("kept").numpy(), count=num_blocks * self.dim).reshape(num_blocks, self.dim)
        kept = torch.from_numpy(kept.astype(bool))
        rows = torch.diff(ends, prepend=ends.new_zeros(1))
        width = kept.sum(1)
        self.register_buffer("_kept", kept, persistent=False)
        self.register_buffer("_start", ends - rows, persistent=False)
        self.register_buffer("_value_start", torch.cumsum(rows * width, 0) - rows * width, persistent=False)
        self.register_buffer("_width", width, persistent=False)
        # column j of a block is its (rank of j among kept dims)-th stored value
        self.register_buffer("_col_rank", torch.cumsum(kept.long(), 1) - 1, persistent=False)

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        g = ids + self._offsets
        b = torch.bucketize(g, self.array("block_end").long(), right=True)
        base = self._value_start[b] + (g - self._start[b]) * self._width[b]               # [N, F]
        at = base.unsqueeze(-1) + self._col_rank[b].clamp(min=0)                          # [N, F, D]
        values = self.array("values")
        if values.numel() == 0:
            return torch.zeros(*ids.shape, self.dim)
        return values[at.clamp(max=values.numel() - 1)] * self._kept[b]


_POPCOUNT8 = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.long)


@register_served("optembed")
class OptEmbedServed(ServedTable):
    """Kept rows at each field's dim, found by a keep bitmap and a rank per 64-bit word."""

    needs = ("keep_bits", "keep_rank")

    def setup(self) -> None:
        self.register_buffer("_popcount", _POPCOUNT8.clone(), persistent=False)
        self.register_buffer("_field_rank", self._rank(self._offsets), persistent=False)

    def _rank(self, g: torch.Tensor) -> torch.Tensor:
        """Kept ids before global id ``g`` (any shape)."""
        words = self.array("keep_bits").view(torch.int64)
        w = words[g >> 6]
        below = w & ((torch.ones_like(g) << (g & 63)) - 1)
        bytes_ = below.unsqueeze(-1).contiguous().view(torch.uint8).long()
        return self.array("keep_rank").long()[g >> 6] + self._popcount[bytes_].sum(-1)

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        g = ids + self._offsets
        words = self.array("keep_bits").view(torch.int64)
        kept = ((words[g >> 6] >> (g & 63)) & 1).bool()
        row = self._rank(g) - self._field_rank
        out = []
        for j, name in enumerate(self.field_names):
            weight = self.array(f"{name}.weight")
            if weight.shape[0] == 0:
                out.append(torch.zeros(ids.shape[0], self.dim))
                continue
            vec = weight[row[:, j].clamp(0, weight.shape[0] - 1)] * kept[:, j, None]
            out.append(nn.functional.pad(vec, (0, self.dim - weight.shape[1])))
        return torch.stack(out, 1)


@register_served("autodim")
class AutoDimServed(ServedTable):
    """Per field rows at the searched dim, mapped to D by a linear layer."""

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.stack([nn.functional.embedding(ids[:, j], self.array(f"{n}.weight")) @ self.array(f"{n}.proj")
                            + self.array(f"{n}.bias") for j, n in enumerate(self.field_names)], 1)


@register_served("sid", "sid-ngram", "sid-hash")
class SemanticIdServed(ServedTable):
    """Hashed rows for fields without content; per content field, its packed code tuples summed over
    the n-gram table (plus, for ``sid-hash``, a hashed ID row mixed in by the gate)."""

    needs = ("weight", "hash_a", "hash_b", "buckets")

    def setup(self) -> None:
        self.content = [self.field_names.index(n) for n in self.spec["content_fields"]]
        self.levels, self.codes, self.ngram = int(self.spec["levels"]), int(self.spec["codes"]), int(self.spec["ngram"])
        rows = self.array("buckets").clone()
        rows[self.content] = 0
        self.register_buffer("_row_offsets", torch.cumsum(rows, 0) - rows, persistent=False)
        self.register_buffer("_hashed", rows < self._sizes, persistent=False)
        self.register_buffer("_base", torch.tensor([self.codes ** i for i in range(self.ngram)]), persistent=False)

    def _content(self, j: int, x: torch.Tensor) -> torch.Tensor:
        name = self.field_names[j]
        idx = x.unsqueeze(-1) * self.levels + torch.arange(self.levels)
        codes = _gather_bits(self.array(f"{name}/codes"), idx, _code_bits(self.codes))     # [N, L]
        windows = codes.unfold(1, self.ngram, 1)
        rows = (windows * self._base).sum(-1) + torch.arange(windows.shape[1]) * self.codes ** self.ngram
        sem = nn.functional.embedding(rows, self.array(f"{name}/book")).sum(1)
        if f"{name}/ids" not in self._names:
            return sem
        h = _universal_hash(x, self.array("hash_a")[j], self.array("hash_b")[j], self.array("buckets")[j])
        hid = nn.functional.embedding(h, self.array(f"{name}/ids"))
        gate = self.array(f"{name}/gate")
        g = torch.sigmoid(nn.functional.linear(torch.cat([sem, hid], -1), gate[None, :-1], gate[-1:]))
        return g * sem + (1 - g) * hid

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        h = _universal_hash(ids, self.array("hash_a"), self.array("hash_b"), self.array("buckets").clamp(min=1))
        rows = torch.where(self._hashed, h, ids) + self._row_offsets
        weight = self.array("weight")
        return torch.stack([self._content(j, ids[:, j]) if j in self.content
                            else nn.functional.embedding(rows[:, j], weight) for j in range(self.num_fields)], 1)
