"""Deep Hash Embedding: k hashes of an id decoded into a vector by an MLP (Kang et al., KDD 2021).

Two tables: ``dhe`` (the paper's encoding, k = 1024 hashes into 10^6 buckets, one network per
large field and small fields as plain rows, as the VLDB 2024 study builds it) and ``dhe-shared``
(one network for every field, the encoding no wider than the hidden layers).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from embpress.tables.base import (
    FP32_BYTES,
    INT64_BYTES,
    Budget,
    BudgetError,
    CompressedTable,
    Field,
    register_table,
    to_numpy,
)
from embpress.tables.full import INIT_STD
from embpress.tables.hashing import PRIME, hash_coefficients, universal_hash

DISTRIBUTIONS = ("uniform", "gaussian")
BN_EPS = 1e-5
_TINY = 1e-12



def largest_width(fits: Callable[[int], bool], done: Callable[[int], bool] = lambda h: False) -> int:
    """The largest width ``h >= 1`` with ``fits(h)`` (true up to some width, false beyond), 0 if none:
    doubling, then bisection. A fitting width at which ``done(h)`` holds ends the search there."""
    lo, hi = 0, 1
    while fits(hi):
        if done(hi):
            return hi
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # fits(lo) (or lo == 0), not fits(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo

@register_table("dhe-shared")
class SharedDeepHashEmbedding(CompressedTable):
    """Deep Hash Embedding with one network for all fields (a variant of Kang et al., KDD 2021,
    arXiv:2010.10784, Sec. 4, Fig. 1; ``dhe`` is the paper's form).

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

    >>> t = SharedDeepHashEmbedding(fields=[Field("a", 100_000)], dim=16, budget=400_000)
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
                raise ValueError(f"{self.method}: {name} must be an int >= {lo}, got {v!r}")
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"{self.method}: distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
        if self.total_ids >= PRIME:
            raise ValueError(f"{self.method}: {self.total_ids:,} ids in all exceed the hash prime {PRIME:,}")
        # shapes: hash_a, hash_b, field_offsets; per Linear (layers + 1) weight [out, in] and bias
        self.reserve_metadata({"num_buckets": 0, "distribution": distribution}, ndims=3 + 3 * (layers + 1))
        self.hidden = self._largest_hidden()
        if self.hidden < 1:
            raise BudgetError(
                f"{self.method}: budget {self.max_bytes:,} bytes is below the smallest network "
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
        return largest_width(lambda h: self.fits(self._bytes_for(h)))

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
        return fold_batch_norm(self.mlp)

    def array_bytes(self) -> int:
        return self._bytes_for(self.hidden)

    def serving_arrays(self) -> dict[str, np.ndarray]:
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


HASH_DTYPE = np.int32
"""Stored dtype of the hash coefficients: ``a, b < p = 2**31 - 1`` fit a signed 32-bit int."""


def decoder(num_inputs: int, hidden: int, dim: int, layers: int, batch_norm: bool) -> nn.Sequential:
    """``layers`` blocks ``Linear -> BatchNorm -> Mish`` of width ``hidden``, then ``Linear(hidden, dim)``."""
    blocks: list[nn.Module] = []
    width = num_inputs
    for _ in range(layers):
        blocks.append(nn.Linear(width, hidden))
        if batch_norm:
            blocks.append(nn.BatchNorm1d(hidden, eps=BN_EPS))
        blocks.append(nn.Mish())
        width = hidden
    blocks.append(nn.Linear(width, dim))
    return nn.Sequential(*blocks)


def fold_batch_norm(mlp: nn.Sequential) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(weight [out, in], bias [out])`` of each Linear of ``mlp`` with its eval-mode BatchNorm folded in."""
    out: list[tuple[torch.Tensor, torch.Tensor]] = []
    modules = list(mlp)
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


def _run_training(mlp: nn.Sequential, enc: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """The decoder in training mode on the occurrences ``enc[inverse]``; the first Linear runs once
    per distinct encoding (it acts on each row alone), BatchNorm sees every occurrence."""
    x = mlp[0](enc)[inverse]
    for m in mlp[1:]:
        if isinstance(m, nn.BatchNorm1d) and x.shape[0] < 2:
            # batch statistics need two rows: a single occurrence uses the running statistics
            x = nn.functional.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias,
                                         training=False, eps=m.eps)
        else:
            x = m(x)
    return x


@register_table("dhe")
class DeepHashEmbedding(CompressedTable):
    """Deep Hash Embedding as in the paper and the VLDB 2024 study (Kang et al., KDD 2021,
    arXiv:2010.10784, Sec. 3-4; Hsword/Hetu ``EmbeddingMemoryCompression`` ``DHETrainer``).

    Encoding (fixed, nothing learned): ``k`` universal hashes ``h_i(x) = ((a_i x + b_i) mod p) mod m``
    of the field-local id, made real: ``2 h / (m - 1) - 1`` (``"uniform"``, in [-1, 1]) or Box-Muller
    pairs (``"gaussian"``). The paper and the study use k = 1024, m = 10^6, uniform.
    Decoder: per large field its own network of ``layers`` blocks ``Linear -> BatchNorm -> Mish`` of
    width ``H``, then ``Linear(H, D)`` (the study: five blocks). Only ``H`` shrinks to meet the budget.

    Which fields get a network (the study's ``use_multi`` rule): a field is stored as plain fp32 rows
    when its ids are at most ``threshold`` or when its rows take no more bytes than one network;
    every other field has a network. ``H`` is the largest width with
    ``hash coefficients + sum over fields of min(rows, network) <= budget``
    (each term grows with ``H``, so the search is monotone). The ``k`` pairs ``(a_i, b_i)`` are
    shared by the networks (each field has its own decoder, so the encoding need not differ per
    field) and stored as int32 (``8 k`` bytes, counted whenever a field has a network).
    Serving bytes: the hash pairs, every Linear weight and bias at fp32 with eval-mode BatchNorm
    folded into the Linear before it (exact), and the plain rows.

    Training generates the encodings on the fly: one vectorised hash of the distinct ids of the
    batch (shared by all networks), the first Linear once per distinct id of each field.

    Args:
        num_hash: ``k``, the encoding width (paper: 1024).
        num_buckets: ``m``, the range of each hash (paper: 10^6).
        layers: hidden blocks per network (study: 5).
        distribution: ``"uniform"`` or ``"gaussian"`` encoding.
        batch_norm: BatchNorm after each hidden Linear (folded away at export).
        threshold: fields with at most this many ids are always plain rows (the study's
            ``--threshold``, default 0: only the size rule applies).
        hash_seed: seed of the hash coefficients.

    Shapes: ``ids [N, F] -> [N, F, D]``; a network decodes ``[U, k]`` encodings of its field's distinct ids.

    >>> t = DeepHashEmbedding(fields=[Field("user", 100_000), Field("site", 30)], dim=16, budget="10x")
    >>> t.num_hash, t.hidden, t.network_fields, t.serving_bytes() <= t.max_bytes
    (1024, 106, (0,), True)
    """

    family = "inter"

    def __init__(self, *, fields: Sequence[Field], dim: int, budget: Budget = None, num_hash: int = 1024,
                 num_buckets: int = 1_000_000, layers: int = 5, distribution: str = "uniform",
                 batch_norm: bool = True, threshold: int = 0, hash_seed: int = 0) -> None:
        super().__init__(fields=fields, dim=dim, budget=budget)
        self.num_hash = num_hash
        self.num_buckets = num_buckets
        self.layers = layers
        self.distribution = distribution
        self.batch_norm = batch_norm
        self.threshold = threshold
        self.hash_seed = hash_seed
        for name, v, lo in (("num_hash", num_hash, 1), ("num_buckets", num_buckets, 2), ("layers", layers, 1),
                            ("threshold", threshold, 0)):
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"dhe: {name} must be an int >= {lo}, got {v!r}")
        if num_buckets > PRIME:
            raise ValueError(f"dhe: num_buckets must be at most the hash prime {PRIME:,}, got {num_buckets:,}")
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"dhe: distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
        if distribution == "gaussian" and num_hash % 2:
            raise ValueError(f"dhe: the gaussian encoding pairs hashes (Box-Muller): num_hash must be even, "
                             f"got {num_hash}")
        self.reserve_metadata({"num_buckets": 0, "distribution": distribution})
        self.hidden = self._largest_hidden()
        if self.hidden < 1:
            raise BudgetError(
                f"dhe: budget {self.max_bytes:,} bytes is below the smallest table: {self._cost(1):,} bytes "
                f"with hidden width 1, {num_hash} hashes ({self.hash_bytes:,} bytes of coefficients) and the "
                f"small fields as rows (full table {self.full_bytes:,} bytes, budget {self.budget})"
            )
        self.network_fields = self._network_fields(self.hidden)
        self.plain_fields = tuple(j for j in range(self.num_fields) if j not in self.network_fields)
        a, b = hash_coefficients(num_hash, hash_seed)
        self.register_buffer("hash_a", a.to(torch.int32))
        self.register_buffer("hash_b", b.to(torch.int32))
        self.nets = nn.ModuleList(decoder(num_hash, self.hidden, dim, layers, batch_norm)
                                  for _ in self.network_fields)
        sizes = [self.fields[j].num_embeddings for j in self.plain_fields]
        self.rows = nn.Embedding(sum(sizes), dim, sparse=True) if sizes else None
        if self.rows is not None:
            nn.init.normal_(self.rows.weight, std=INIT_STD)
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64) if sizes else np.zeros(0, np.int64)
        self.register_buffer("_plain_offsets", torch.from_numpy(offsets), persistent=False)

    # -- sizing -------------------------------------------------------------------------------

    @property
    def hash_bytes(self) -> int:
        """Bytes of the ``k`` stored ``(a, b)`` pairs."""
        return 2 * self.num_hash * np.dtype(HASH_DTYPE).itemsize

    def network_bytes(self, hidden: int) -> int:
        """Serving bytes of one network of width ``hidden`` (fp32, BatchNorm folded)."""
        k, d = self.num_hash, self.dim
        return ((k + 1) * hidden + (self.layers - 1) * (hidden + 1) * hidden + (hidden + 1) * d) * FP32_BYTES

    def _network_fields(self, hidden: int) -> tuple[int, ...]:
        net = self.network_bytes(hidden)
        return tuple(j for j, f in enumerate(self.fields)
                     if f.num_embeddings > self.threshold and f.num_embeddings * self.dim * FP32_BYTES > net)

    def _bytes_for(self, hidden: int) -> int:
        nets = self._network_fields(hidden)
        rows = sum(f.num_embeddings for j, f in enumerate(self.fields) if j not in nets)
        return (self.hash_bytes if nets else 0) + len(nets) * self.network_bytes(hidden) + rows * self.dim * FP32_BYTES

    def _cost(self, hidden: int) -> int:
        """:meth:`_bytes_for` and the arrays' shape words: hash_a, hash_b (with networks), rows [n, D]
        (with plain fields), per network (layers + 1) weights [out, in] and biases."""
        nets = len(self._network_fields(hidden))
        ndims = (2 if nets else 0) + (2 if nets < self.num_fields else 0) + nets * 3 * (self.layers + 1)
        return self._bytes_for(hidden) + INT64_BYTES * ndims

    def _largest_hidden(self) -> int:
        """The largest ``H`` whose table fits, 0 if none; past the width at which every field would be
        rows the table no longer changes, so the search stops there."""
        biggest = max(f.num_embeddings for f in self.fields) * self.dim * FP32_BYTES
        return largest_width(lambda h: self.fits(self._cost(h)), done=lambda h: self.network_bytes(h) >= biggest)

    # -- lookup -------------------------------------------------------------------------------

    def encode(self, ids: torch.Tensor) -> torch.Tensor:
        """Field-local ids ``[...]`` -> dense hash encodings ``[..., k]`` (float32)."""
        return dhe_encode(ids.long(), self.hash_a.long(), self.hash_b.long(), self.num_buckets, self.distribution)

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        cols: list[torch.Tensor | None] = [None] * self.num_fields
        if self.plain_fields:
            plain = self.rows(ids[:, list(self.plain_fields)] + self._plain_offsets)       # [N, P, D]
            for i, j in enumerate(self.plain_fields):
                cols[j] = plain[:, i]
        if self.network_fields:
            local = ids[:, list(self.network_fields)]                                         # [N, G]
            uniq, inverse = torch.unique(local, return_inverse=True)
            enc = self.encode(uniq)                                                           # [U, k], one hash pass
            for g, (j, mlp) in enumerate(zip(self.network_fields, self.nets, strict=True)):
                rows, inv = torch.unique(inverse[:, g], return_inverse=True)                  # distinct ids of field j
                if self.training:
                    cols[j] = _run_training(mlp, enc[rows], inv)
                else:  # eval: the whole decoder is a function of the id, once per distinct id
                    cols[j] = mlp(enc[rows])[inv]
        return torch.stack(cols, 1)

    def flops_per_lookup(self) -> int:
        """Multiply-adds of one network per id (hashes and activations not counted); 0 without networks."""
        if not self.network_fields:
            return 0
        return self.num_hash * self.hidden + (self.layers - 1) * self.hidden**2 + self.hidden * self.dim

    # -- serving ------------------------------------------------------------------------------

    def array_bytes(self) -> int:
        return self._bytes_for(self.hidden)

    def serving_arrays(self) -> dict[str, np.ndarray]:
        """``hash_a``, ``hash_b`` (int32 ``[k]``, when a field has a network), ``rows`` (fp32, the plain
        fields' rows in field order) and ``net<j>/weight<i>``, ``net<j>/bias<i>`` for field ``j``'s network."""
        state: dict[str, np.ndarray] = {}
        if self.network_fields:
            state["hash_a"] = self.hash_a.numpy().astype(HASH_DTYPE)
            state["hash_b"] = self.hash_b.numpy().astype(HASH_DTYPE)
        if self.rows is not None:
            state["rows"] = to_numpy(self.rows.weight)
        for j, mlp in zip(self.network_fields, self.nets, strict=True):
            for i, (w, b) in enumerate(fold_batch_norm(mlp)):
                state[f"net{j}/weight{i}"] = to_numpy(w)
                state[f"net{j}/bias{i}"] = to_numpy(b)
        return state

    def serving_spec(self) -> dict[str, int | str]:
        return {"num_buckets": self.num_buckets, "distribution": self.distribution}

    def sparse_parameters(self) -> list[nn.Parameter]:
        return [] if self.rows is None else [self.rows.weight]

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, num_hash={self.num_hash}, hidden={self.hidden}, layers={self.layers}, "
                f"networks={list(self.network_fields)}, distribution={self.distribution!r}")
