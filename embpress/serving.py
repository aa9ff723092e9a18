"""Serve a trained table from its serving artifact alone: the ``serving_state()`` arrays on disk.

``table.save_serving(path)`` (:func:`save`) writes exactly the arrays of ``serving_state()`` at
their stored precision into a safetensors file (no pickle, memory-mappable) whose metadata holds
a small JSON header: format version, method spec, fields (name, ids), dim, the method's serving
spec (the few settings its lookup needs that no array holds, e.g. Q-R's ``operation``) and a
CRC-32 of the array bytes. The file is ``serving_bytes()`` plus the safetensors header.

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
VERSION = 1
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
        "spec": table.serving_spec(), "serving_bytes": nbytes, "crc32": _crc(state),
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


def read(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``(header, arrays)`` of a serving artifact, checked: structure, sizes and CRC-32.

    Raises FileNotFoundError for a missing file and ValueError naming the file for anything
    malformed, truncated or damaged.
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

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
    if header.get("version") != VERSION:
        raise ValueError(f"serving artifact {path} has format version {header.get('version')!r}; this "
                         f"embpress reads version {VERSION}")
    expected = 8 + hlen + int(header.get("serving_bytes", -1))
    if size != expected:
        raise ValueError(f"serving artifact {path} is {size:,} bytes but its header describes {expected:,}: "
                         f"truncated or padded")
    try:
        arrays = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"serving artifact {path} is malformed: {e}") from None
    if _crc(arrays) != header.get("crc32"):
        raise ValueError(f"serving artifact {path} fails its CRC-32 check: the array bytes are damaged")
    return header, arrays


def load(path: str | os.PathLike) -> ServedTable:
    """An inference-only table served from the artifact at ``path`` (see the module docstring)."""
    header, arrays = read(path)
    method = header["method"]
    cls = served_class(method)
    try:
        return cls(fields=[(str(n), int(s)) for n, s in header["fields"]], dim=int(header["dim"]),
                   arrays={k: torch.from_numpy(np.array(v)) for k, v in arrays.items()},
                   spec=header.get("spec") or {}, method=method)
    except (KeyError, IndexError, TypeError) as e:
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
    needs = ("weight",)

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(ids + self._offsets, self.array("weight"))


@register_served("noid")
class NoIdServed(ServedTable):
    needs = ("weight",)

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        return self.array("weight").expand(ids.shape[0], -1, -1)


@register_served("hash")
class HashServed(ServedTable):
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
    needs = ("weight", "hash_a", "hash_b", "buckets")

    def setup(self) -> None:
        self.buckets = int(self.array("buckets")[0])

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        rows = _universal_hash(ids.unsqueeze(-1), self.array("hash_a"), self.array("hash_b"), self.buckets)
        return nn.functional.embedding(rows, self.array("weight")).flatten(-2)


@register_served("robe")
class RobeServed(ServedTable):
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
            x = ids[:, f]
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
        inner_arrays = {k: v for k, v in arrays.items() if not k.endswith((".codes", ".scale", ".offset"))}
        for inner_name, (param, shape) in spec["param_of"].items():
            codes = arrays[f"{param}.codes"]
            w = codes.float() * arrays[f"{param}.scale"][:, None] + arrays[f"{param}.offset"][:, None]
            inner_arrays[inner_name] = w.reshape(shape)
        self.inner = served_class(spec["inner"])(fields=fields, dim=dim, arrays=inner_arrays,
                                                 spec=spec["inner_spec"], method=spec["inner"])

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        return self.inner._lookup(ids)
