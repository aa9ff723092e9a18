"""The table contract: fields, budgets, the registry and the base class of every compressed table.

A table maps field-local ids ``LongTensor[..., F]`` to vectors ``Tensor[..., F, D]`` and reports
``serving_bytes()``: every byte needed to serve lookups after training, at stored precision.
Multi-stage methods describe their stages as data (:class:`Stage`) that the trainer runs.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

FP32_BYTES = 4
INT64_BYTES = 8
"""Bytes of one int64 word (metadata: spec numbers, array shapes)."""


class BudgetError(ValueError):
    """Raised when a method cannot fit the requested memory budget."""


@dataclass(frozen=True)
class Field:
    """One categorical field: ids are ``0 .. num_embeddings - 1``.

    ``counts`` holds training-set frequencies (int64, length ``num_embeddings``) for
    frequency-aware methods. Preprocessing numbers ids by descending frequency, so id 0 is
    the most frequent value of the field.

    ``content`` optionally holds one content vector per id (float32 ``[num_embeddings, C]``,
    e.g. a text embedding of an item's title): semantic-ID tables build their codes from it;
    every other method ignores it.
    """

    name: str
    num_embeddings: int
    counts: np.ndarray | None = field(default=None, compare=False, repr=False)
    content: np.ndarray | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.num_embeddings, int | np.integer) or self.num_embeddings < 1:
            raise ValueError(
                f"Field {self.name!r}: num_embeddings must be a positive int, got {self.num_embeddings!r}"
            )
        if self.counts is not None:
            counts = np.asarray(self.counts)
            if counts.shape != (self.num_embeddings,):
                raise ValueError(
                    f"Field {self.name!r}: counts must have shape ({self.num_embeddings},), got {counts.shape}"
                )
            if (counts < 0).any():
                raise ValueError(f"Field {self.name!r}: counts must be non-negative")
        if self.content is not None:
            content = np.asarray(self.content)
            if content.ndim != 2 or content.shape[0] != self.num_embeddings or content.shape[1] < 1:
                raise ValueError(f"Field {self.name!r}: content must have shape ({self.num_embeddings}, C) "
                                 f"with C >= 1 (one vector per id), got {content.shape}")
            if not np.issubdtype(content.dtype, np.floating):
                raise ValueError(f"Field {self.name!r}: content must hold floats, got dtype {content.dtype}")
            if not np.isfinite(content).all():
                raise ValueError(f"Field {self.name!r}: content has NaN or infinite values")

    def frequencies(self) -> np.ndarray:
        """Training counts as int64; ids numbered by descending frequency when no counts are known."""
        if self.counts is not None:
            return np.asarray(self.counts, dtype=np.int64)
        # Unknown counts: assume ids are already sorted by frequency (Zipf-like decay).
        return (self.num_embeddings - np.arange(self.num_embeddings)).astype(np.int64)


@dataclass(frozen=True)
class Ratio:
    """A budget given as a compression ratio against the fp32 full table (``full_bytes / value``)."""

    value: float

    def __post_init__(self) -> None:
        if not (isinstance(self.value, int | float) and math.isfinite(self.value) and self.value >= 1):
            raise ValueError(f"compression ratio must be a finite number >= 1, got {self.value!r}")


Budget = int | Ratio | None
"""An absolute byte count (int), a :class:`Ratio`, or None for no compression."""


def parse_budget(budget: int | float | str | Ratio | None) -> Budget:
    """Accept ``4096`` (bytes), ``Ratio(10)``, ``"10x"`` (ratio) or None."""
    if budget is None or isinstance(budget, Ratio):
        return budget
    if isinstance(budget, bool):
        raise TypeError(f"budget must be an int byte count, a Ratio or 'Nx', got {budget!r}")
    if isinstance(budget, int | np.integer):
        if budget <= 0:
            raise ValueError(f"budget in bytes must be positive, got {budget}")
        return int(budget)
    if isinstance(budget, str) and budget.lower().endswith("x"):
        try:
            return Ratio(float(budget[:-1]))
        except ValueError:
            pass
    raise ValueError(
        f"budget {budget!r} not understood: pass an int byte count, Ratio(10) or the string '10x'"
    )


def full_table_bytes(fields: Sequence[Field], dim: int) -> int:
    """Bytes of the uncompressed fp32 table: one ``dim`` vector per id of every field."""
    return sum(f.num_embeddings for f in fields) * dim * FP32_BYTES


def budget_bytes(budget: Budget, full_bytes: int) -> int:
    """The largest ``serving_bytes`` a table may have under ``budget``."""
    if budget is None:
        return full_bytes
    if isinstance(budget, Ratio):
        return int(full_bytes // budget.value)
    return int(budget)


# ----------------------------------------------------------------------------- stages


@dataclass(frozen=True)
class ParamGroup:
    """Parameters a stage trains with their own optimiser instead of the trainer's default.

    Args:
        name: shown in errors and logs (``thresholds``, ``alpha``).
        params: the parameters; each may belong to one group of a stage only, and the group's
            parameters are left out of the trainer's default optimisers (and of ``arch_parameters``).
        optimizer: ``"adam"`` (torch Adam; coupled L2 ``weight_decay`` as torch's) or ``"sgd"``
            (plain SGD, no momentum).
        lr: learning rate; None means the trainer's ``TrainConfig.lr``.
        weight_decay: L2 penalty of the optimiser (torch's ``weight_decay``).
        bilevel: step this group on validation batches (with ``arch_parameters``) instead of
            training batches; only meaningful in a bilevel stage.
    """

    name: str
    params: Sequence[nn.Parameter]
    optimizer: str = "adam"
    lr: float | None = None
    weight_decay: float = 0.0
    bilevel: bool = False

    OPTIMIZERS: ClassVar[tuple[str, ...]] = ("adam", "sgd")

    def __post_init__(self) -> None:
        if self.optimizer not in self.OPTIMIZERS:
            raise ValueError(f"ParamGroup {self.name!r}: optimizer must be one of {self.OPTIMIZERS}, "
                             f"got {self.optimizer!r}")
        if self.lr is not None and not (isinstance(self.lr, int | float) and self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"ParamGroup {self.name!r}: lr must be a positive number or None, got {self.lr!r}")
        if not (isinstance(self.weight_decay, int | float) and self.weight_decay >= 0):
            raise ValueError(f"ParamGroup {self.name!r}: weight_decay must be a number >= 0, "
                             f"got {self.weight_decay!r}")


@dataclass
class StageContext:
    """What a stage hook may use: the model, the data loaders, an evaluation function, the training
    configuration and where the stage stands.

    ``evaluate()`` returns validation AUC of the current model (used by search stages).
    ``config`` is the trainer's ``TrainConfig`` (None outside a trainer). ``step`` counts the
    optimiser steps of the stage so far (1 in the first ``on_step`` call), ``total_steps`` is the
    stage's planned number, ``steps_per_epoch`` the steps of one epoch and ``batch_size`` the
    training batch size; they are 0 before the stage plans its steps (in ``before``).
    """

    model: nn.Module
    table: CompressedTable
    evaluate: Callable[[], float]
    train_batches: Callable[[], Any]
    valid_batches: Callable[[], Any]
    generator: torch.Generator
    log: Callable[[str], None] = print
    config: Any = None
    step: int = 0
    total_steps: int = 0
    steps_per_epoch: int = 0
    batch_size: int = 0
    train_rows: int = 0


@dataclass(frozen=True)
class Stage:
    """One step of a multi-stage method, run by the trainer.

    Args:
        name: shown in progress and records (``train``, ``search``, ``retrain``, ``quantize``).
        epochs: epochs to train; None means the trainer's default (with early stopping); 0 trains nothing.
            With ``stop`` set it is the most epochs the stage may take.
        bilevel: alternate a model step on a training batch with a step of
            ``table.arch_parameters()`` on a validation batch (DARTS, first order).
        reset_head: restore the model head (everything but the table) to its initial weights
            before the stage, as lottery-ticket style retraining does.
        early_stopping: keep the best validation state and stop when it stops improving.
        before, after: hooks called with a :class:`StageContext` around the stage.
        on_step: called after every optimiser step (after the bilevel step too) with the
            context, ``ctx.step`` set: projections (clip to a range), schedules (gradual
            pruning), re-quantization.
        stop: checked after every step (after ``on_step``); True ends the stage there, e.g.
            "until the target sparsity". Early stopping's best-state restore does not apply to a
            stage that ``stop`` ended (the state it stopped at is the one it asked for).
        groups: called at the stage's start (after ``before``) to name parameter groups with
            their own optimiser (:class:`ParamGroup`); the rest get the trainer's defaults.
        train_head: False keeps the model head (everything but the table) fixed for the stage: only
            the table's parameters train, as in a search that tunes the embeddings and their
            architecture alone.
    """

    name: str
    epochs: int | None = None
    bilevel: bool = False
    reset_head: bool = False
    early_stopping: bool = True
    before: Callable[[StageContext], None] | None = None
    after: Callable[[StageContext], None] | None = None
    on_step: Callable[[StageContext], None] | None = None
    stop: Callable[[StageContext], bool] | None = None
    groups: Callable[[], Sequence[ParamGroup]] | None = None
    train_head: bool = True


# ----------------------------------------------------------------------------- registry

_TABLES: dict[str, type[CompressedTable]] = {}


FAMILIES = ("inter", "intra", "reference")


def register_table(name: str) -> Callable[[type[CompressedTable]], type[CompressedTable]]:
    """Class decorator: make a table buildable by its short ``name``."""

    def deco(cls: type[CompressedTable]) -> type[CompressedTable]:
        if cls.family not in FAMILIES:
            raise TypeError(f"table method {name!r}: family must be one of {FAMILIES}, got {cls.family!r}")
        if name in _TABLES and _TABLES[name] is not cls:
            raise ValueError(f"table method {name!r} is registered twice ({_TABLES[name]} and {cls})")
        cls.method = name
        _TABLES[name] = cls
        return cls

    return deco


def registered_tables() -> list[str]:
    """Short names of every registered table method, sorted."""
    from embpress import tables as _  # noqa: F401  (import registers the methods)

    return sorted(_TABLES)


def table_class(name: str) -> type[CompressedTable]:
    registered_tables()
    if name not in _TABLES:
        raise ValueError(f"unknown table method {name!r}; available: {sorted(_TABLES)}")
    return _TABLES[name]


def method_family(name: str) -> str:
    """The family of a method name, ``METHOD+int8`` compositions taking their inner method's;
    ``"unknown"`` for a name this version does not register (e.g. in old records).

    >>> method_family("robe"), method_family("pep"), method_family("mgqe+int8"), method_family("nope")
    ('inter', 'intra', 'inter', 'unknown')
    """
    base = name.split("+", 1)[0]
    registered_tables()
    return _TABLES[base].family if base in _TABLES else "unknown"


def table_hparams(cls: type[CompressedTable]) -> dict[str, inspect.Parameter]:
    """The method's own keyword hyper-parameters (everything but fields, dim and budget)."""
    sig = inspect.signature(cls.__init__)
    return {
        k: p
        for k, p in sig.parameters.items()
        if k not in ("self", "fields", "dim", "budget") and p.kind == p.KEYWORD_ONLY
    }


def build_table(
    spec: str,
    *,
    fields: Sequence[Field],
    dim: int,
    budget: int | float | str | Ratio | None = None,
    **hparams: Any,
) -> CompressedTable:
    """Build a table from a short spec: a method name, optionally with ``+int8`` / ``+int16``.

    ``build_table("qr+int8", fields=..., dim=16, budget=Ratio(10))`` trains a Q-R table and
    quantizes its parameters after training; the two compressions multiply.

    >>> t = build_table("hash", fields=[Field("user", 10_000)], dim=8, budget=Ratio(10))
    >>> t(torch.tensor([[3]])).shape
    torch.Size([1, 1, 8])
    """
    budget = parse_budget(budget)
    parts = spec.split("+")
    if len(parts) > 2 or not all(parts):
        raise ValueError(f"table spec {spec!r} not understood: use METHOD or METHOD+int8")
    if len(parts) == 2:
        from embpress.tables.quant import PostTrainingQuantized

        return PostTrainingQuantized.wrap(parts[0], suffix=parts[1], fields=fields, dim=dim,
                                          budget=budget, **hparams)
    cls = table_class(parts[0])
    if cls.reference and budget is not None:
        raise ValueError(f"table method {spec!r} is a reference of one fixed size: it would ignore budget "
                         f"{budget!r}; pass budget=None (or compress it: '{spec}+int8')")
    allowed = table_hparams(cls)
    unknown = sorted(set(hparams) - set(allowed))
    if unknown:
        raise ValueError(
            f"table method {spec!r} has no hyper-parameter(s) {unknown}; it takes {sorted(allowed)}"
        )
    return cls(fields=fields, dim=dim, budget=budget, **hparams)


# ----------------------------------------------------------------------------- base class


class CompressedTable(nn.Module):
    """Base of every table: validates ids, stores the contract arguments, defines the hooks.

    Subclasses implement ``_lookup(ids: LongTensor[N, F]) -> Tensor[N, F, D]``,
    ``serving_bytes()`` (analytic, at stored precision) and ``serving_state()`` (the arrays a
    server would hold, at stored precision; the tests check their size against
    ``serving_bytes()``).
    """

    method: ClassVar[str] = "?"
    family: ClassVar[str] = ""
    """The study's taxonomy: ``"inter"`` (ids or fields may share storage: hashing, composition,
    codebooks), ``"intra"`` (one vector per id, each made cheaper: dimensions, pruning, precision),
    or ``"reference"`` (``full``, ``noid``). Every registered table sets it."""
    reference: ClassVar[bool] = False
    """True for reference points (``full``, ``noid``) that have one fixed size whatever the budget."""
    tune_space: ClassVar[dict[str, tuple]] = {}
    """Hyper-parameters ``embpress bench --tune`` searches besides the learning rates, each as
    ``("choice", v1, v2, ...)``, ``("uniform", lo, hi)`` or ``("loguniform", lo, hi)``; empty: none."""

    def __init__(self, *, fields: Sequence[Field], dim: int, budget: Budget = None) -> None:
        super().__init__()
        fields = tuple(fields)
        if not fields:
            raise ValueError("a table needs at least one Field")
        if not all(isinstance(f, Field) for f in fields):
            raise TypeError("fields must be a sequence of embpress.Field")
        names = [f.name for f in fields]
        if len(set(names)) != len(names):
            raise ValueError(f"field names must be unique, got {names}")
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        self.fields = fields
        self.dim = dim
        self.budget = parse_budget(budget)
        self.full_bytes = full_table_bytes(fields, dim)
        self.max_bytes = budget_bytes(self.budget, self.full_bytes)
        self.metadata_reserve = 0
        sizes = torch.tensor([f.num_embeddings for f in fields], dtype=torch.long)
        self.register_buffer("_sizes", sizes, persistent=False)
        offsets = torch.zeros(len(fields), dtype=torch.long)
        offsets[1:] = torch.cumsum(sizes, 0)[:-1]
        self.register_buffer("_offsets", offsets, persistent=False)

    @property
    def num_fields(self) -> int:
        return len(self.fields)

    @property
    def total_ids(self) -> int:
        return int(sum(f.num_embeddings for f in self.fields))

    # -- contract ---------------------------------------------------------------------------

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """``ids: LongTensor[..., F]`` field-local ids -> ``Tensor[..., F, D]``."""
        ids = self.check_ids(ids)
        lead = ids.shape[:-1]
        out = self._lookup(ids.reshape(-1, self.num_fields))
        return out.reshape(*lead, self.num_fields, self.dim)

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def serving_bytes(self) -> int:
        """Every byte a server holds: the arrays (:meth:`array_bytes`), the small metadata of
        :meth:`serving_spec` (:func:`spec_bytes`) and the arrays' shapes (:meth:`array_ndims` int64
        words), counted the same way for every method."""
        return self.array_bytes() + spec_bytes(self.serving_spec()) + INT64_BYTES * self.array_ndims()

    def serving_state(self) -> dict[str, np.ndarray]:
        """What a server stores, at stored precision: the method's arrays (:meth:`serving_arrays`),
        its metadata arrays (:func:`spec_arrays`) and their shapes (:func:`shape_arrays`);
        :meth:`save_serving` writes exactly these."""
        arrays = self.serving_arrays()
        return {**arrays, **spec_arrays(self.serving_spec()), **shape_arrays(arrays)}

    def array_ndims(self) -> int:
        """How many dimensions the serving arrays have in all: each is one int64 word of the
        ``meta/shapes`` array (a TT table's core shapes hold its ranks, a CSR table's its row
        count). The default counts them on :meth:`serving_arrays`; a table whose arrays are costly
        to build may answer analytically (the contract suite checks it against the arrays)."""
        return sum(np.ndim(a) for a in self.serving_arrays().values())

    def array_bytes(self) -> int:  # pragma: no cover - abstract
        """Bytes of :meth:`serving_arrays`, analytic (without building them)."""
        raise NotImplementedError

    def serving_arrays(self) -> dict[str, np.ndarray]:  # pragma: no cover - abstract
        """The method's serving arrays (parameters, codes, indices, hash coefficients, scales)."""
        raise NotImplementedError

    def serving_spec(self) -> dict[str, Any]:
        """The settings a served lookup needs beyond the arrays (bit widths, bucket counts, choices):
        ints, floats, strings, lists and dicts of them. They are stored as metadata arrays
        (:func:`spec_arrays`) and counted in :meth:`serving_bytes`."""
        return {}

    def save_serving(self, path: str | os.PathLike) -> None:
        """Write exactly the :meth:`serving_state` arrays (safetensors) and a JSON header to ``path``,
        atomically; :func:`embpress.serving.load` serves lookups from it alone."""
        from embpress import serving

        serving.save(self, path)

    def train_state_bytes(self, sparse_optimizer: str = "adam") -> int:
        """Bytes training holds for this table now, counted from its tensors: every parameter,
        buffer and tensor attribute of its modules (supernets, masks, caches, codes), plus what the
        trainer adds per trainable parameter: Adam's two moments (Adam and SparseAdam keep them
        dense, at the parameter's size; with ``sparse_optimizer="rowwise_adagrad"`` a sparse
        parameter has one accumulator a row instead) and, for parameters without sparse gradients,
        the dense gradient. What scales with the batch, not the table, is not counted: sparse gradients (a
        batch's rows) and RowSparseAdam's scratch (about 16 + 4 * D bytes per lookup). The trainer records the
        largest value over the stages (``TrainResult.train_state_bytes``).

        >>> t = build_table("hash", fields=[Field("a", 1000)], dim=4, budget=Ratio(10))
        >>> t.serving_bytes(), t.train_state_bytes()   # 96 rows x 16 B x (weight + 2 moments) + 49 B of buffers
        (1600, 4657)
        """
        seen: dict[int, int] = {}

        def add(t: torch.Tensor) -> None:
            if t.device.type != "meta" and t.numel():
                key = t.untyped_storage().data_ptr()
                seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())

        for module in self.modules():
            for t in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
                add(t)
            for v in vars(module).values():
                if isinstance(v, torch.Tensor) and not isinstance(v, nn.Parameter):
                    add(v)
        total = sum(seen.values())
        sparse = {id(p) for p in self.sparse_parameters()}
        for p in self.parameters():
            if p.requires_grad:
                nbytes = p.numel() * p.element_size()
                if id(p) not in sparse:
                    total += 3 * nbytes  # Adam's two moments and the dense gradient
                elif sparse_optimizer == "rowwise_adagrad":
                    total += p.shape[0] * p.element_size()
                else:
                    total += 2 * nbytes
        return int(total)

    def regularizer(self) -> torch.Tensor | None:
        """An extra loss term added by the trainer at every step (None: nothing)."""
        return None

    def stages(self) -> list[Stage]:
        """Training stages; a single-stage method just trains."""
        return [Stage("train")]

    def sparse_parameters(self) -> list[nn.Parameter]:
        """Parameters that receive sparse gradients (the trainer gives them SparseAdam)."""
        return []

    def arch_parameters(self) -> list[nn.Parameter]:
        """Architecture parameters updated on validation batches in bilevel stages."""
        return []

    def extra_repr(self) -> str:
        return f"fields={len(self.fields)}, dim={self.dim}, budget={self.budget}"

    # -- helpers for subclasses ----------------------------------------------------------------

    def check_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Raise a clear error for wrong dtypes, shapes, or ids outside ``[0, num_embeddings)``."""
        if not isinstance(ids, torch.Tensor):
            raise TypeError(f"ids must be a torch.Tensor, got {type(ids).__name__}; convert a list or numpy "
                            "array with torch.as_tensor(ids)")
        if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
            raise TypeError(f"ids must be an integer tensor, got dtype {ids.dtype}")
        if ids.dim() == 0 or ids.shape[-1] != self.num_fields:
            raise ValueError(
                f"ids must have shape [..., F] with F={self.num_fields} fields, got {tuple(ids.shape)}"
            )
        ids = ids.long()
        if ids.numel():
            flat = ids.reshape(-1, self.num_fields)
            bad = (flat < 0) | (flat >= self._sizes)
            if bool(bad.any()):
                row, col = (int(v) for v in bad.nonzero()[0])
                f = self.fields[col]
                raise ValueError(
                    f"id {int(flat[row, col])} out of range for field {f.name!r} "
                    f"(valid ids are 0..{f.num_embeddings - 1}) at row {row}"
                )
        return ids

    def global_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Field-local ``[N, F]`` ids to ids in one concatenated id space."""
        return ids + self._offsets

    def reserve_metadata(self, spec: dict[str, Any], *, ndims: int = 0) -> None:
        """Set aside the bytes of a serving spec like ``spec`` (:func:`spec_bytes`: fixed by its
        structure and strings, not by its numbers) and of ``ndims`` shape words (the serving arrays'
        dimensions) before sizing the arrays to :attr:`array_budget`."""
        self.metadata_reserve = spec_bytes(spec) + INT64_BYTES * ndims

    @property
    def array_budget(self) -> int:
        """The bytes the serving arrays may take: the budget less the reserved metadata."""
        return self.max_bytes - self.metadata_reserve

    def fits(self, nbytes: int) -> bool:
        """Whether arrays of ``nbytes`` fit beside the reserved metadata."""
        return nbytes <= self.array_budget

    def require_fit(self, nbytes: int, what: str) -> None:
        """Raise :class:`BudgetError` when arrays of ``nbytes`` exceed :attr:`array_budget`."""
        if nbytes > self.array_budget:
            raise BudgetError(
                f"{self.method}: {what} needs {nbytes:,} bytes but the budget allows {self.array_budget:,} "
                f"besides {self.metadata_reserve} bytes of metadata "
                f"(full table {self.full_bytes:,} bytes, budget {self.budget})"
            )


# ----------------------------------------------------------------------------- metadata

SPEC_INTS = "meta/ints"
SPEC_TEXT = "meta/text"
"""Names of the metadata arrays: every number of a serving spec as an int64 word (floats by their
float64 bits, a string by its length), and the strings' UTF-8 bytes."""


def _flatten_spec(value: Any, ints: list[int], text: bytearray, where: str) -> Any:
    """Append ``value``'s leaves to ``ints``/``text``; return its schema (structure and dict keys)."""
    if isinstance(value, dict):
        return {"d": {str(k): _flatten_spec(value[k], ints, text, f"{where}.{k}") for k in sorted(value)}}
    if isinstance(value, list | tuple):
        return {"l": [_flatten_spec(v, ints, text, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, bool | np.bool_):
        ints.append(int(value))
        return "b"
    if isinstance(value, int | np.integer):
        ints.append(int(value))
        return "i"
    if isinstance(value, float | np.floating):
        ints.append(int(np.float64(value).view(np.int64)))
        return "f"
    if isinstance(value, str):
        raw = value.encode("utf-8")
        ints.append(len(raw))
        text.extend(raw)
        return "s"
    if value is None:
        return "n"
    raise TypeError(f"serving spec value at {where} has type {type(value).__name__}: use int, float, str, "
                    "None, or lists and dicts of them")


def spec_schema(spec: dict[str, Any]) -> Any:
    """The structure of a serving spec (dicts' keys, lists' lengths, leaf types) without its values."""
    return _flatten_spec(spec, [], bytearray(), "spec")


def spec_arrays(spec: dict[str, Any]) -> dict[str, np.ndarray]:
    """A serving spec's values as stored: ``meta/ints`` (int64, one word per number or string length)
    and ``meta/text`` (uint8, the strings' UTF-8 bytes); empty arrays are left out.

    >>> {k: v.tolist() for k, v in spec_arrays({"bits": 4, "mode": "mult"}).items()}
    {'meta/ints': [4, 4], 'meta/text': [109, 117, 108, 116]}
    """
    ints: list[int] = []
    text = bytearray()
    _flatten_spec(spec, ints, text, "spec")
    out = {}
    if ints:
        out[SPEC_INTS] = np.asarray(ints, dtype=np.int64)
    if text:
        out[SPEC_TEXT] = np.frombuffer(bytes(text), dtype=np.uint8).copy()
    return out


SPEC_SHAPES = "meta/shapes"
"""Name of the shapes array: every dimension of every serving array, arrays in name order."""


def shape_arrays(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The serving arrays' shapes as stored: ``meta/shapes`` (int64), the dimensions of each array
    in name order; left out when there are none. A server needs them to read the arrays, so they
    count in ``serving_bytes()`` like the spec's numbers.

    >>> shape_arrays({"b": np.zeros(3), "a": np.zeros((2, 4))})["meta/shapes"].tolist()
    [2, 4, 3]
    """
    words = [int(d) for k in sorted(arrays) for d in np.shape(arrays[k])]
    return {SPEC_SHAPES: np.asarray(words, dtype=np.int64)} if words else {}


def check_shapes(arrays: dict[str, Any], where: str) -> None:
    """Raise ValueError unless ``meta/shapes`` in ``arrays`` lists the other arrays' shapes."""
    body = {k: v for k, v in arrays.items() if not k.startswith("meta/")}
    want = [int(d) for k in sorted(body) for d in tuple(body[k].shape)]
    got = arrays.get(SPEC_SHAPES)
    got = [] if got is None else [int(v) for v in np.asarray(got).reshape(-1).tolist()]
    if got != want:
        raise ValueError(f"{where}: {SPEC_SHAPES} lists {got[:8]}{'...' if len(got) > 8 else ''} but the "
                         f"arrays' shapes are {want[:8]}{'...' if len(want) > 8 else ''}")


def spec_bytes(spec: dict[str, Any]) -> int:
    """Bytes of a serving spec as stored (:func:`spec_arrays`): 8 per number or string, plus the
    strings' UTF-8 bytes; the keys are the spec's structure, kept in the artifact's header.

    >>> spec_bytes({}), spec_bytes({"bits": 4}), spec_bytes({"bits": 4, "mode": "mult"})
    (0, 8, 20)
    """
    return state_nbytes(spec_arrays(spec))


def spec_from_arrays(schema: Any, ints: np.ndarray | None, text: np.ndarray | None) -> Any:
    """Rebuild a serving spec from its :func:`spec_schema` and its metadata arrays (the inverse of
    :func:`spec_arrays`)."""
    words = iter([] if ints is None else np.asarray(ints, dtype=np.int64).tolist())
    raw = b"" if text is None else np.asarray(text, dtype=np.uint8).tobytes()
    pos = 0

    def build(node: Any) -> Any:
        nonlocal pos
        if isinstance(node, dict) and "d" in node:
            return {k: build(v) for k, v in node["d"].items()}
        if isinstance(node, dict) and "l" in node:
            return [build(v) for v in node["l"]]
        if node == "n":
            return None
        word = next(words)
        if node == "b":
            return bool(word)
        if node == "i":
            return int(word)
        if node == "f":
            return float(np.int64(word).view(np.float64))
        if node == "s":
            value = raw[pos:pos + word].decode("utf-8")
            pos += word
            return value
        raise ValueError(f"serving spec schema has an unknown node {node!r}")

    return build(schema)


def state_nbytes(state: dict[str, np.ndarray]) -> int:
    """Total bytes of a serving state, each array at its own dtype."""
    return int(sum(np.asarray(v).nbytes for v in state.values()))


def to_numpy(t: torch.Tensor, dtype: np.dtype | type = np.float32) -> np.ndarray:
    return t.detach().cpu().numpy().astype(dtype, copy=False)


def params_of(cls: type) -> list[str]:
    """Names of a dataclass's or table's keyword parameters (for records and repr)."""
    if dataclasses.is_dataclass(cls):
        return [f.name for f in dataclasses.fields(cls)]
    return list(table_hparams(cls))


class Embedding(nn.Module):
    """A drop-in for ``torch.nn.Embedding(num_embeddings, dim)`` backed by any compressed table.

    >>> emb = Embedding(50_000, 16, method="qr", budget=Ratio(20))
    >>> emb(torch.tensor([[1, 2], [3, 49_999]])).shape
    torch.Size([2, 2, 16])
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *, method: str = "hash",
                 budget: int | float | str | Ratio | None = None, counts: np.ndarray | None = None,
                 **hparams: Any) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.table = build_table(method, fields=[Field("ids", num_embeddings, counts)],
                                 dim=embedding_dim, budget=budget, **hparams)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """``ids: LongTensor[*]`` -> ``Tensor[*, D]``."""
        if not isinstance(ids, torch.Tensor):
            self.table.check_ids(ids)  # the TypeError that says how to convert
        return self.table(ids.unsqueeze(-1)).squeeze(-2)

    def serving_bytes(self) -> int:
        return self.table.serving_bytes()
