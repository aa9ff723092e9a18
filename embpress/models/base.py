"""CTR model heads: each takes any compressed table and dense features, and returns click logits."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from embpress.tables.base import CompressedTable

_MODELS: dict[str, type[CTRModel]] = {}


def register_model(name: str) -> Callable[[type[CTRModel]], type[CTRModel]]:
    """Class decorator: make a model head buildable by its short ``name``."""

    def deco(cls: type[CTRModel]) -> type[CTRModel]:
        cls.name = name
        _MODELS[name] = cls
        return cls

    return deco


def registered_models() -> list[str]:
    from embpress import models as _  # noqa: F401  (import registers the heads)

    return sorted(_MODELS)


def build_model(name: str, *, table: CompressedTable, num_dense: int, **hparams: Any) -> CTRModel:
    """Build the head ``name`` around ``table``; unknown heads or hyper-parameters raise ValueError."""
    registered_models()
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; available: {sorted(_MODELS)}")
    cls = _MODELS[name]
    allowed = {k for k, p in inspect.signature(cls.__init__).parameters.items()
               if p.kind == p.KEYWORD_ONLY and k not in ("table", "num_dense")}
    unknown = sorted(set(hparams) - allowed)
    if unknown:
        raise ValueError(f"model {name!r} has no hyper-parameter(s) {unknown}; it takes {sorted(allowed)}")
    return cls(table=table, num_dense=num_dense, **hparams)


def mlp(sizes: Sequence[int], *, last_activation: bool = False, dropout: float = 0.0) -> nn.Sequential:
    """Linear layers with ReLU between them (and after the last one if asked)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2 or last_activation:
            layers.append(nn.ReLU())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class CTRModel(nn.Module):
    """Base of the heads: ``forward(dense float32[B, Dd], ids int64[B, F]) -> logits float32[B]``.

    The table is a submodule named ``table``; everything else is the head (the trainer resets
    only the head in stages that ask for it).
    """

    name: str = "?"

    def __init__(self, *, table: CompressedTable, num_dense: int) -> None:
        super().__init__()
        if not isinstance(table, CompressedTable):
            raise TypeError(f"table must be a CompressedTable, got {type(table).__name__}")
        if num_dense < 0:
            raise ValueError(f"num_dense must be >= 0, got {num_dense}")
        self.table = table
        self.num_dense = num_dense
        self.num_fields = table.num_fields
        self.dim = table.dim

    def check_dense(self, dense: torch.Tensor) -> torch.Tensor:
        if dense.dim() != 2 or dense.shape[1] != self.num_dense:
            raise ValueError(f"dense must have shape [B, {self.num_dense}], got {tuple(dense.shape)}")
        if not dense.is_floating_point():
            raise TypeError(f"dense must be a float tensor, got {dense.dtype}")
        return dense

    def head_parameters(self) -> list[nn.Parameter]:
        table_ids = {id(p) for p in self.table.parameters()}
        return [p for p in self.parameters() if id(p) not in table_ids]

    def head_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.state_dict().items() if not k.startswith("table.")}
