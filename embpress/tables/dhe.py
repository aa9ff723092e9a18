"""Deep Hash Embedding: no table at all; k hashes of the id are decoded into a vector by an MLP."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from embpress.tables.base import (
    FP32_BYTES,
    Budget,
    BudgetError,
    CompressedTable,
    Field,
    register_table,
    to_numpy,
)
from embpress.tables.hashing import PRIME, hash_coefficients, universal_hash

INT64_BYTES = 8
DISTRIBUTIONS = ("uniform", "gaussian")
BN_EPS = 1e-5
_TINY = 1e-12


@register_table("dhe")
class DeepHashEmbedding(CompressedTable):
    """Deep Hash Embedding (Kang et al., KDD 2021, arXiv:2010.10784, Sec. 4, Fig. 1).

    The dense hash encoding of an id is ``k`` universal hashes into ``[0, m)`` made real:
    ``2 h / (m - 1) - 1`` (``"uniform"``, in [-1, 1]) or Box-Muller pairs (``"gaussian"``).
    A deep network decodes it: ``layers`` hidden blocks ``Linear -> BatchNorm -> Mish`` of
    width ``H``, then ``Linear(H, D)`` (the paper's and the VLDB 2024 study's design; the
    study uses k = 1024, m = 10^6 and five hidden blocks). The encoding stores nothing but
    hash coefficients; the network is learned.

    One network serves all fields. Each (field, id) is hashed as one global id
    ``id + offset_f`` (fields occupy disjoint ranges of one id space), which salts the
    hashes by field without per-field coefficients. The paper embeds each feature with its
    own network and the study builds one per large field; sharing pays for the network once
    instead of F times, which is what makes DHE usable at high compression ratios.

    Sizing: the largest hidden width ``H`` that fits the budget, with the encoding width
    ``k = min(num_hash, H)`` (rounded down to even for ``"gaussian"``): the paper's k = 1024
    whenever the budget affords ``H >= 1024``, and a narrower encoding below that so the
    network keeps its width. Serving bytes count every Linear weight and bias at fp32 with
    batch norm folded into the Linear before it (exact in eval mode), the ``2 k`` hash
    coefficients and the F field offsets (int64).

    Args:
        num_hash: ``k``, upper bound of the encoding width.
        num_buckets: ``m``, range of each hash.
        layers: hidden blocks of the decoder.
        distribution: ``"uniform"`` or ``"gaussian"`` encoding.
        batch_norm: BatchNorm after each hidden Linear (folded away at export).
        hash_seed: seed of the hash coefficients.

    Shapes: ``ids [N, F] -> [N, F, D]``; the decoder runs on ``N * F`` encodings of width ``k``.

    >>> t = DeepHashEmbedding(fields=[Field("a", 100_000)], dim=16, budget=400_000)
    >>> t.num_inputs, t.hidden, t.serving_bytes() <= 400_000
    (138, 138, True)
    """

    family = "inter"

    def __init__(self, *, fields: Sequence[Field], dim: int, budget: Budget = None, num_hash: int = 1024,
                 num_buckets: int = 1_000_000, layers: int = 5, distribution: str = "uniform",
                 batch_norm: bool = True, hash_seed: int = 0) -> None:
        super().__init__(fields=fields, dim=dim, budget=budget)
        self.num_hash = num_hash
        self.num_buckets = num_buckets
        self.layers = layers
        self.distribution = distribution
        self.batch_norm = batch_norm
        self.hash_seed = hash_seed
        for name, v, lo in (("num_hash", num_hash, 1), ("num_buckets", num_buckets, 2), ("layers", layers, 1)):
            if not isinstance(v, int) or v < lo:
                raise ValueError(f"dhe: {name} must be an int >= {lo}, got {v!r}")
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"dhe: distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
        if self.total_ids >= PRIME:
            raise ValueError(f"dhe: {self.total_ids:,} ids in all exceed the hash prime {PRIME:,}")
        self.hidden = self._largest_hidden()
        if self.hidden < 1:
            raise BudgetError(
                f"dhe: budget {self.max_bytes:,} bytes is below the smallest network "
                f"({self._bytes_for(1):,} bytes for hidden width 1 and {self._inputs_for(1)} hash)"
            )
        self.num_inputs = self._inputs_for(self.hidden)
        a, b = hash_coefficients(self.num_inputs, hash_seed)
        self.register_buffer("hash_a", a)
        self.register_buffer("hash_b", b)
        blocks: list[nn.Module] = []
        width = self.num_inputs
        for _ in range(layers):
            blocks.append(nn.Linear(width, self.hidden))
            if batch_norm:
                blocks.append(nn.BatchNorm1d(self.hidden, eps=BN_EPS))
            blocks.append(nn.Mish())
            width = self.hidden
        blocks.append(nn.Linear(width, dim))
        self.mlp = nn.Sequential(*blocks)

    # -- sizing -------------------------------------------------------------------------------

    def _inputs_for(self, hidden: int) -> int:
        k = min(self.num_hash, max(hidden, 1))
        if self.distribution == "gaussian" and k > 1:
            k -= k % 2
        return k

    def _bytes_for(self, hidden: int) -> int:
        k = self._inputs_for(hidden)
        weights = (k + 1) * hidden + (self.layers - 1) * (hidden + 1) * hidden + (hidden + 1) * self.dim
        return weights * FP32_BYTES + (2 * k + self.num_fields) * INT64_BYTES

    def _largest_hidden(self) -> int:
        lo, hi = 0, 1
        while self._bytes_for(hi) <= self.max_bytes:
            lo, hi = hi, hi * 2
        while hi - lo > 1:  # bytes(lo) fits (or lo == 0), bytes(hi) does not
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self._bytes_for(mid) <= self.max_bytes else (lo, mid)
        return lo

    # -- lookup -------------------------------------------------------------------------------

    def encode(self, ids: torch.Tensor) -> torch.Tensor:
        """Field-local ids ``[N, F]`` -> dense hash encodings ``[N, F, k]`` (float32)."""
        return self._encode_global(self.global_ids(ids))

    def _encode_global(self, gid: torch.Tensor) -> torch.Tensor:
        return dhe_encode(gid, self.hash_a, self.hash_b, self.num_buckets, self.distribution)

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        # In training the encoding and the first Linear act on each id alone, so they run once per
        # distinct id of the batch (Zipf batches repeat ids heavily) and are gathered back;
        # BatchNorm and the later layers still see every occurrence, so training is unchanged.
        # In eval mode (BatchNorm on running statistics) the whole decoder is a function of the id,
        # so it runs once per distinct id, as a server would.
        flat = self.global_ids(ids).reshape(-1)
        uniq, inverse = torch.unique(flat, return_inverse=True)
        if not self.training:
            return self.mlp(self._encode_global(uniq))[inverse].reshape(*ids.shape, self.dim)
        x = self.mlp[0](self._encode_global(uniq))[inverse]
        for m in self.mlp[1:]:
            if isinstance(m, nn.BatchNorm1d) and self.training and x.shape[0] < 2:
                # batch statistics need two rows: a single id uses the running statistics
                x = nn.functional.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias,
                                             training=False, eps=m.eps)
            else:
                x = m(x)
        return x.reshape(*ids.shape, self.dim)

    def flops_per_lookup(self) -> int:
        """Multiply-adds of the decoder per id (the hashes and activations not counted)."""
        return self.num_inputs * self.hidden + (self.layers - 1) * self.hidden**2 + self.hidden * self.dim

    # -- serving ------------------------------------------------------------------------------

    def folded_layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(weight [out, in], bias [out])`` of each Linear with its eval-mode BatchNorm folded in."""
        out: list[tuple[torch.Tensor, torch.Tensor]] = []
        modules = list(self.mlp)
        with torch.no_grad():
            for i, m in enumerate(modules):
                if not isinstance(m, nn.Linear):
                    continue
                w, b = m.weight.detach().double(), m.bias.detach().double()
                nxt = modules[i + 1] if i + 1 < len(modules) else None
                if isinstance(nxt, nn.BatchNorm1d):
                    scale = nxt.weight.double() / torch.sqrt(nxt.running_var.double() + nxt.eps)
                    w = w * scale.unsqueeze(1)
                    b = (b - nxt.running_mean.double()) * scale + nxt.bias.double()
                out.append((w.float(), b.float()))
        return out

    def serving_bytes(self) -> int:
        return self._bytes_for(self.hidden)

    def serving_state(self) -> dict[str, np.ndarray]:
        state = {"hash_a": self.hash_a.numpy(), "hash_b": self.hash_b.numpy(),
                 "field_offsets": self._offsets.numpy().astype(np.int64)}
        for i, (w, b) in enumerate(self.folded_layers()):
            state[f"weight{i}"] = to_numpy(w)
            state[f"bias{i}"] = to_numpy(b)
        return state

    def serving_spec(self) -> dict[str, int | str]:
        return {"num_buckets": self.num_buckets, "distribution": self.distribution}

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, num_hash={self.num_inputs}, hidden={self.hidden}, layers={self.layers}, "
                f"distribution={self.distribution!r}")


def dhe_encode(gid: torch.Tensor, hash_a: torch.Tensor, hash_b: torch.Tensor, num_buckets: int,
               distribution: str) -> torch.Tensor:
    """Global ids ``[...]`` -> dense hash encodings ``[..., k]`` (float32), uniform in [-1, 1] or
    Gaussian by Box-Muller over pairs of hashes (arXiv:2010.10784, Sec. 3.2)."""
    h = universal_hash(gid.unsqueeze(-1), hash_a, hash_b, num_buckets)
    u = h.double() / (num_buckets - 1)                                        # [0, 1]
    if distribution == "uniform":
        return (2 * u - 1).float()
    u1, u2 = u[..., 0::2], u[..., 1::2]                                        # Box-Muller pairs
    radius = torch.sqrt(-2 * torch.log(u1.clamp(min=_TINY)))
    angle = 2 * math.pi * u2
    z = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=-1).flatten(-2)
    return z[..., : u.shape[-1]].float()
