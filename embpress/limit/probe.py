"""The free-embedding capacity probe of LIMIT: the largest corpus whose every top-k subset a d-dim space can express.

Weller et al., "On the Theoretical Limitations of Embedding-Based Retrieval" (arXiv 2508.21038, §4 and
google-deepmind/limit ``code/free_embedding_experiment.py``): n documents, one query for every k-subset of
them (all C(n, k)), and the query and document vectors are optimised directly, with no model in between.
Full-batch InfoNCE with every document a negative (temperature 0.1), Adam (lr 0.01), both sides
L2-normalised after each step, early stop when the loss stops improving (patience 1000, min delta 1e-5) or
when every query ranks its k documents on top (checked every 50 steps). The critical n for a dimension d
is the largest n that succeeds, found by galloping then binary search. The paper's fit over d is
``-10.53 + 4.03 d + 0.052 d^2 + 0.0037 d^3`` (:func:`paper_critical_n`).

The compression question ("how many bits does a top-k need") is asked by storing the optimised document
vectors through a codec and letting the queries re-fit against the decoded documents (documents frozen):
the critical n under a codec is a lower bound of what a quantisation-aware optimisation could reach.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch


def paper_critical_n(d: float) -> float:
    """The LIMIT paper's cubic fit of the critical n at dimension d (k = 2).

    >>> round(paper_critical_n(512))
    512290
    """
    return -10.53 + 4.03 * d + 0.052 * d**2 + 0.0037 * d**3


def subset_qrels(n: int, k: int) -> np.ndarray:
    """Every k-subset of ``range(n)`` as rows of an int64 (C(n, k), k) array (the probe's queries).

    >>> subset_qrels(3, 2).tolist()
    [[0, 1], [0, 2], [1, 2]]
    """
    if k < 1 or n < k:
        raise ValueError(f"need 1 <= k <= n, got n={n}, k={k}")
    if k == 2:
        a, b = np.triu_indices(n, 1)
        return np.stack([a, b], axis=1).astype(np.int64)
    if math.comb(n, k) > 50_000_000:
        raise ValueError(f"C({n}, {k}) = {math.comb(n, k)} queries is too many for the probe")
    return np.array(list(itertools.combinations(range(n), k)), dtype=np.int64).reshape(-1, k)


def topk_accuracy(q: torch.Tensor, docs: torch.Tensor, rel: torch.Tensor, *, block: int = 1 << 16) -> float:
    """Fraction of relevant documents found in each query's top-k (k = rel.shape[1]), as the reference.

    Args:
        q: (Q, d) queries. docs: (n, d) documents. rel: (Q, k) int64 relevant document ids.
    """
    k = rel.shape[1]
    found = 0
    with torch.no_grad():
        for s in range(0, q.shape[0], block):
            top = torch.topk(q[s:s + block] @ docs.T, k, dim=1).indices
            found += int((top[:, :, None] == rel[s:s + block, None, :]).any(dim=1).sum())
    return found / rel.numel()


@dataclass
class FitResult:
    """One optimisation: the vectors, the best accuracy seen (the reference's success signal) and the cost."""

    queries: torch.Tensor
    docs: torch.Tensor
    accuracy: float
    iterations: int
    seconds: float

    @property
    def success(self) -> bool:
        return self.accuracy >= 1.0


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def fit_free_embeddings(n: int, d: int, *, k: int = 2, lr: float = 0.01, temperature: float = 0.1,
                        max_iters: int = 100_000, patience: int = 1000, min_delta: float = 1e-5,
                        eval_every: int = 50, seed: int = 0, docs: torch.Tensor | None = None,
                        queries: torch.Tensor | None = None) -> FitResult:
    """Optimise free query and document vectors so that every k-subset of n documents is some query's top-k.

    Args:
        n: documents. d: dimension. k: relevant documents per query (all C(n, k) queries).
        lr, temperature: Adam learning rate and InfoNCE temperature (reference: 0.01, 0.1).
        max_iters, patience, min_delta: iteration cap and early stop on the loss (reference: 100k, 1000, 1e-5).
        eval_every: steps between top-k checks; the run stops at 100 % accuracy.
        seed: initialisation seed (a ``torch.Generator`` is built from it).
        docs: fixed (n, d) document vectors: when given only the queries are optimised (the codec check).
        queries: initial (C(n, k), d) queries (default: random unit vectors).

    Returns:
        :class:`FitResult` with the last vectors and the best accuracy seen.
    """
    for name, v in (("n", n), ("d", d), ("k", k), ("max_iters", max_iters), ("eval_every", eval_every)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    rel = torch.from_numpy(subset_qrels(n, k))
    gen = torch.Generator().manual_seed(seed)
    q = _normalize(torch.randn(rel.shape[0], d, generator=gen)) if queries is None else queries.clone()
    if q.shape != (rel.shape[0], d):
        raise ValueError(f"queries must be ({rel.shape[0]}, {d}), got {tuple(q.shape)}")
    fixed_docs = docs is not None
    if fixed_docs:
        if tuple(docs.shape) != (n, d):
            raise ValueError(f"docs must be ({n}, {d}), got {tuple(docs.shape)}")
        dv = docs.detach().clone().float()
    else:
        dv = _normalize(torch.randn(n, d, generator=gen))
    params = [q] if fixed_docs else [q, dv]
    opt = torch.optim.Adam(params, lr=lr)
    nq = rel.shape[0]
    pos_rows = torch.arange(nq).repeat_interleave(k)
    pos_cols = rel.reshape(-1)
    best_loss, wait, best_acc, it = math.inf, 0, 0.0, 0
    t0 = time.perf_counter()
    with torch.no_grad():
        for it in range(1, max_iters + 1):
            # InfoNCE averaged over positives, with its gradient written out (one (Q, n) buffer, in place):
            # L = mean_i lse_i - mean_(i,j in rel_i) s_ij, s = q d^T / T; dL/ds = softmax/Q - onehot/(Q k).
            s = torch.mm(q, dv.T).mul_(1.0 / temperature)
            lse = torch.logsumexp(s, dim=1)
            loss = float(lse.mean() - s[pos_rows, pos_cols].mean())
            g = s.sub_(lse[:, None]).exp_().mul_(1.0 / nq)
            g.index_put_((pos_rows, pos_cols), torch.tensor(-1.0 / (nq * k)), accumulate=True)
            q.grad = torch.mm(g, dv).mul_(1.0 / temperature)
            if not fixed_docs:
                dv.grad = torch.mm(g.T, q).mul_(1.0 / temperature)
            del g, s
            opt.step()
            q.copy_(_normalize(q))
            if not fixed_docs:
                dv.copy_(_normalize(dv))
            if loss < best_loss - min_delta:
                best_loss, wait = loss, 0
            else:
                wait += 1
            if it % eval_every == 0 or it == 1 or wait >= patience or it == max_iters:
                best_acc = max(best_acc, topk_accuracy(q, dv, rel))
                if best_acc >= 1.0:
                    break
            if wait >= patience:
                break
    return FitResult(q, dv, best_acc, it, time.perf_counter() - t0)


def critical_n(success: Callable[[int], bool], start: int, *, step: int = 1, lo_bound: int = 2) -> tuple[int, dict[int, bool]]:
    """The largest n with ``success(n)`` by galloping from ``start`` (steps step, 2 step, 4 step, ...) then
    binary search between the last success and the first failure (the reference's phases 1 and 2).

    Returns (critical n, every n tried -> outcome). Assumes success is (mostly) monotone in n.

    >>> critical_n(lambda n: n <= 37, 10)[0]
    37
    """
    tried: dict[int, bool] = {}

    def ok(n: int) -> bool:
        if n not in tried:
            tried[n] = bool(success(n))
        return tried[n]

    start = max(start, lo_bound)
    if ok(start):
        low, s = start, step
        while True:
            n = low + s
            if ok(n):
                low, s = n, s * 2
            else:
                high = n
                break
    else:
        high, s, low = start, step, None
        while high > lo_bound:
            n = max(high - s, lo_bound)
            if ok(n):
                low = n
                break
            high, s = n, s * 2
        if low is None:
            return lo_bound - 1, tried
    while high - low > 1:
        mid = (low + high) // 2
        if ok(mid):
            low = mid
        else:
            high = mid
    return low, tried


@dataclass
class ProbeRun:
    """The critical n of one (d, k, storage) with every trial's outcome and cost."""

    d: int
    k: int
    codec: str
    critical_n: int
    trials: list[dict] = field(default_factory=list)


def codec_check(fit: FitResult, codec_spec: str, *, k: int = 2, seed: int = 0, max_iters: int = 20_000,
                patience: int = 1000, lr: float = 0.01, temperature: float = 0.1) -> FitResult:
    """Store ``fit``'s documents through ``codec_spec`` (fit on them, encode, decode) and re-fit the queries
    against the decoded documents; success means every top-k is still expressible at that storage."""
    from embpress.vectors import build_codec

    x = fit.docs.numpy().astype(np.float32)
    codec = build_codec(codec_spec, seed=seed).fit(x)
    dec = torch.from_numpy(np.ascontiguousarray(codec.decode(codec.encode(x)), dtype=np.float32))
    n, d = x.shape
    return fit_free_embeddings(n, d, k=k, lr=lr, temperature=temperature, max_iters=max_iters, patience=patience,
                               seed=seed, docs=dec, queries=fit.queries)


def probe(d: int, *, k: int = 2, codecs: tuple[str, ...] = (), start: int | None = None, step: int = 1,
          seed: int = 0, max_iters: int = 100_000, patience: int = 1000, sweep: bool = False,
          known: Mapping[tuple[str, int], Mapping] | None = None,
          on_trial: Callable[[str, int, dict], None] | None = None,
          log: Callable[[str], None] | None = None) -> list[ProbeRun]:
    """Critical n at dimension ``d`` in float32, then under each codec (searched below the float critical n).

    Args:
        d, k: dimension and subset size. codecs: codec specs for the document vectors (e.g. ``("sq8", "bin")``).
        start: first n of the gallop (the reference's ``--enable_critical_n_search``; default: the paper's fit
            at d, at least k + 1).
        step: first gallop step (1, as the reference).
        seed, max_iters, patience: as :func:`fit_free_embeddings`.
        sweep: after the search, also measure n = critical - 4 .. critical + 5 in float32 (the reference's
            phase 3; like the reference, the returned critical n stays the search's).
        known: outcomes already measured, by (storage, n): a dict with ``success``, ``accuracy``,
            ``iterations``, ``seconds`` (resumed from records; not measured again).
        on_trial: called with (storage, n, outcome) after each new measurement (to record it).
        log: called with one line per trial.
    """
    start = start if start is not None else max(k + 1, round(paper_critical_n(d)))
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"step must be a positive int, got {step!r}")
    known = dict(known or {})
    fits: dict[int, FitResult] = {}
    runs: list[ProbeRun] = []

    def float_fit(n: int) -> FitResult:
        if n not in fits:
            fits[n] = fit_free_embeddings(n, d, k=k, seed=seed, max_iters=max_iters, patience=patience)
        return fits[n]

    def outcome(storage: str, n: int, measure: Callable[[], FitResult], run: ProbeRun) -> bool:
        if (storage, n) in known:
            o, tag = dict(known[(storage, n)]), "recorded"
        else:
            r = measure()
            o = {"success": r.success, "accuracy": r.accuracy, "iterations": r.iterations,
                 "seconds": round(r.seconds, 2)}
            known[(storage, n)], tag = o, f"{o['seconds']:.1f}s"
            if on_trial:
                on_trial(storage, n, o)
        run.trials.append({"n": n, **{key: o[key] for key in ("success", "accuracy", "iterations", "seconds")}})
        if log:
            log(f"d={d} {storage} n={n}: {'ok ' if o['success'] else 'FAIL'} acc={o['accuracy']:.5f} "
                f"iters={o['iterations']} {tag}")
        return bool(o["success"])

    run = ProbeRun(d, k, "float32", 0)
    run.critical_n, _ = critical_n(lambda n: outcome("float32", n, lambda: float_fit(n), run), start, step=step,
                                   lo_bound=k + 1)
    runs.append(run)
    if sweep:
        for n in range(max(k + 1, run.critical_n - 4), run.critical_n + 6):
            if ("float32", n) not in known:
                outcome("float32", n, lambda n=n: float_fit(n), run)
    for spec in codecs:
        crun = ProbeRun(d, k, spec, 0)

        def cok(n: int, spec: str = spec, crun: ProbeRun = crun) -> bool:
            if n > run.critical_n:  # stored documents are the float ones: no more than float's capacity
                return False
            float_ok = known[("float32", n)]["success"] if ("float32", n) in known else \
                outcome("float32", n, lambda: float_fit(n), run)
            if not float_ok:
                return False  # float32 fails at n: no stored documents to test
            return outcome(spec, n, lambda: codec_check(float_fit(n), spec, k=k, seed=seed, patience=patience),
                           crun)

        cstart = run.critical_n
        crun.critical_n, _ = critical_n(cok, cstart, step=max(1, round(0.1 * cstart)), lo_bound=k + 1)
        runs.append(crun)
    return runs


def check_at(n: int, d: int, *, k: int = 2, codecs: tuple[str, ...] = (), seed: int = 0, max_iters: int = 100_000,
             patience: int = 1000, known: Mapping[tuple[str, int], Mapping] | None = None,
             on_trial: Callable[[str, int, dict], None] | None = None,
             log: Callable[[str], None] | None = None) -> list[dict]:
    """One n, no search: does float32 express every k-subset of n documents in d dims, and do the codecs
    still after storing its documents? One outcome per storage (a point check where a search costs too much).
    ``known`` and ``on_trial`` as in :func:`probe`: the same trials, so a check and a search share records."""
    known = dict(known or {})
    base: list[FitResult] = []

    def float_fit() -> FitResult:
        if not base:
            base.append(fit_free_embeddings(n, d, k=k, seed=seed, max_iters=max_iters, patience=patience))
        return base[0]

    out = []
    for spec in ("float32", *codecs):
        if (spec, n) in known:
            o, tag = dict(known[(spec, n)]), "recorded"
        else:
            if spec == "float32":
                r = float_fit()
            else:
                if not out[0]["success"]:
                    break  # float32 fails at n: no stored documents to test
                r = codec_check(float_fit(), spec, k=k, seed=seed, patience=patience)
            o = {"success": r.success, "accuracy": r.accuracy, "iterations": r.iterations,
                 "seconds": round(r.seconds, 2)}
            tag = f"{o['seconds']:.1f}s"
            if on_trial:
                on_trial(spec, n, o)
        out.append({"d": d, "k": k, "storage": spec, "n": n, **o})
        if log:
            log(f"d={d} {spec} n={n}: {'ok ' if o['success'] else 'FAIL'} acc={o['accuracy']:.5f} "
                f"iters={o['iterations']} {tag}")
    return out
