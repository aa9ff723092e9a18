"""A Criteo-like synthetic CTR dataset with a planted model in which per-id effects matter.

Ids are Zipf-distributed per field (cardinalities from tens to about a million). The click
probability is ``sigmoid(b + w·dense + sum_f beta_f[id_f] + sum_{f<g in P} <z_f[id_f], z_g[id_g]>)``:
first-order per-id effects ``beta`` and second-order latent vectors ``z`` on a subset ``P`` of
fields. A model can only recover these through per-id embeddings, so hash collisions and low
precision cost measurable AUC, and a model without per-id embeddings is clearly worse.
``max_cardinality`` is the size of the raw value space (as Criteo's raw cardinalities); the
vocabulary is then built on the training split with ``min_count`` like any real log, so a field's
``num_embeddings`` is the number of values seen at least ``min_count`` times, plus one OOV id.
Deterministic from the seed; a million rows in a few seconds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from embpress.data.schema import CTRDataset, Split, frequency_order
from embpress.tables.base import Field


@dataclass(frozen=True)
class SyntheticConfig:
    """Size and shape of the synthetic set. ``rows`` is the total over train/valid/test (8:1:1)."""

    rows: int = 500_000
    num_dense: int = 13
    num_fields: int = 26
    min_cardinality: int = 10
    max_cardinality: int = 1_000_000
    zipf: float = 1.2
    latent_dim: int = 4
    interacting_fields: int = 10
    first_order_std: float = 0.6
    second_order_std: float = 0.6
    dense_std: float = 0.25
    positive_rate: float = 0.25
    min_count: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rows < 30:
            raise ValueError(f"synthetic: rows must be >= 30 (train/valid/test split), got {self.rows}")
        if not 1 <= self.min_cardinality <= self.max_cardinality:
            raise ValueError(
                f"synthetic: need 1 <= min_cardinality <= max_cardinality, got {self.min_cardinality}, "
                f"{self.max_cardinality}"
            )
        if self.num_fields < 1 or self.num_dense < 0:
            raise ValueError("synthetic: need num_fields >= 1 and num_dense >= 0")
        if not 0 < self.positive_rate < 1:
            raise ValueError(f"synthetic: positive_rate must be in (0, 1), got {self.positive_rate}")
        if self.min_count < 1:
            raise ValueError(f"synthetic: min_count must be >= 1, got {self.min_count}")
        if self.zipf <= 0:
            raise ValueError(f"synthetic: zipf exponent must be > 0, got {self.zipf}")

    def cardinalities(self) -> list[int]:
        """Log-spaced from ``min_cardinality`` to ``max_cardinality``."""
        c = np.geomspace(self.min_cardinality, self.max_cardinality, self.num_fields)
        return [int(round(v)) for v in c]


def _zipf_ids(rng: np.random.Generator, n: int, card: int, s: float) -> np.ndarray:
    """``n`` draws from ranks ``0..card-1`` with ``P(r) ∝ (r + 1)^-s``, then a fixed random relabel."""
    weights = (np.arange(1, card + 1, dtype=np.float64)) ** -s
    cdf = np.cumsum(weights)
    cdf /= cdf[-1]
    ranks = np.searchsorted(cdf, rng.random(n), side="right")
    ranks = np.minimum(ranks, card - 1)
    # The raw value of a rank is arbitrary, like a hashed Criteo value: relabel randomly so the
    # frequency order comes from preprocessing, not from the generator.
    return rng.permutation(card)[ranks]


def _calibrated_bias(logit: np.ndarray, rate: float) -> float:
    """The bias b with mean(sigmoid(logit + b)) == rate (bisection; the mean is monotone in b)."""
    sample = logit[:: max(1, len(logit) // 100_000)]
    lo, hi = -30.0 - sample.max(), 30.0 - sample.min()
    for _ in range(60):
        mid = (lo + hi) / 2
        if np.mean(1.0 / (1.0 + np.exp(-(sample + mid)))) < rate:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def make_synthetic(config: SyntheticConfig | None = None) -> CTRDataset:
    """Generate the dataset of ``config`` (defaults: 500k rows, 13 dense, 26 categorical fields)."""
    cfg = config or SyntheticConfig()
    rng = np.random.default_rng(cfg.seed)
    n, F = cfg.rows, cfg.num_fields
    cards = cfg.cardinalities()
    dense = rng.standard_normal((n, cfg.num_dense)).astype(np.float32)
    logit = dense.astype(np.float64) @ (rng.standard_normal(cfg.num_dense) * cfg.dense_std)

    raw = np.empty((n, F), dtype=np.int64)
    for f, card in enumerate(cards):
        raw[:, f] = _zipf_ids(rng, n, card, cfg.zipf)

    # first-order per-id effects
    for f, card in enumerate(cards):
        beta = rng.standard_normal(card) * cfg.first_order_std
        logit += beta[raw[:, f]]

    # second-order effects among the interacting fields: sum over pairs of <z_f, z_g>
    inter = rng.choice(F, size=min(cfg.interacting_fields, F), replace=False)
    k = len(inter)
    if k >= 2:
        scale = cfg.second_order_std / np.sqrt(cfg.latent_dim * k * (k - 1) / 2) ** 0.5
        total = np.zeros((n, cfg.latent_dim))
        sq = np.zeros(n)
        for f in inter:
            z = rng.standard_normal((cards[f], cfg.latent_dim)) * scale
            zf = z[raw[:, f]]
            total += zf
            sq += (zf * zf).sum(1)
        logit += 0.5 * ((total * total).sum(1) - sq)

    logit += _calibrated_bias(logit, cfg.positive_rate)
    label = (rng.random(n) < 1.0 / (1.0 + np.exp(-logit))).astype(np.float32)

    # The same preprocessing as real logs: a vocabulary built on the training split, ids by
    # descending training count, values seen fewer than min_count times share one OOV id (the last).
    n_train, n_valid = int(n * 0.8), int(n * 0.1)
    sparse = np.empty((n, F), dtype=np.int32)
    fields = []
    for f, card in enumerate(cards):
        remap, counts = frequency_order(raw[:n_train, f], card)
        kept = int((counts >= cfg.min_count).sum())
        remap = np.minimum(remap, kept)  # every rare or unseen value -> OOV id `kept`
        field_counts = np.append(counts[:kept], counts[kept:].sum())
        sparse[:, f] = remap[raw[:, f]]
        fields.append(Field(f"C{f + 1}", kept + 1, field_counts))
    tr, va = slice(0, n_train), slice(n_train, n_train + n_valid)
    te = slice(n_train + n_valid, n)
    return CTRDataset(
        name="synthetic",
        fields=tuple(fields),
        dense_names=tuple(f"I{i + 1}" for i in range(cfg.num_dense)),
        train=Split(dense[tr], sparse[tr], label[tr]),
        valid=Split(dense[va], sparse[va], label[va]),
        test=Split(dense[te], sparse[te], label[te]),
        vocab_bytes=0,
        info={"generator": "embpress.data.synthetic", **cfg.__dict__,
              "interacting": sorted(int(i) for i in inter)},
    )
