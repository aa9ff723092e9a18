"""Tuned comparisons (``embpress bench --tune N``): before a (dataset, model, method, ratio) runs its seeds,
Ray Tune searches its learning rates and the hyper-parameters its table declares
(:attr:`embpress.tables.CompressedTable.tune_space`) with ``N`` trials under ASHA, on validation
AUC only (never on test AUC), at the grid's first seed; the first of the ``N`` points is the
grid's defaults, the others are drawn at random. The seeds then run at the best point; their
records carry the chosen values in their configuration (so they are other trials than the
defaults' ones) and the search's settings under ``config["tune"]``, and the report marks them.

Each search's outcome is appended to ``tune.jsonl`` in the run folder, keyed by a fingerprint of
everything it depended on (the untuned trial's whole configuration less the seed, the search
settings), so a resumed run does not search again. Random search draws its points from the
search seed; which trials ASHA stops depends on the order reports arrive in, so a search repeated
from scratch may choose another point when trials run in parallel.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from embpress.bench.ctr import BenchConfig, Trial, _is_reference, run_trial, trial_config
from embpress.bench.records import canonical_json, fingerprint
from embpress.data.schema import CTRDataset
from embpress.tables import table_class
from embpress.tables.base import table_hparams

LR_SPACE = ("loguniform", 3e-4, 3e-2)
"""The learning rates' range (Adam for dense parameters, row-sparse Adam for sparse rows)."""
SCHEDULER = {"name": "asha", "grace_epochs": 2, "reduction_factor": 2}
"""ASHA (Li et al. 2020, arXiv:1810.05934) over validation evaluations (``training_iteration``); no
trial is stopped before ``grace_epochs`` epochs (a first rung at half an epoch stopped the defaults'
learning rate on Frappe, which is slow to start and ends best on validation)."""
TUNE_FILE = "tune.jsonl"


def search_space(method: str) -> dict[str, tuple]:
    """What a search of ``method`` varies: both learning rates and the table's declared space."""
    space = {"lr": LR_SPACE, "sparse_lr": LR_SPACE}
    space.update(table_class(method.split("+")[0]).tune_space)
    return space


def default_point(method: str, cfg: BenchConfig) -> dict[str, Any]:
    """The grid's defaults as a point of :func:`search_space`: every search evaluates it first, so a
    search can only choose another point that did better on validation."""
    params = table_hparams(table_class(method.split("+")[0]))
    return {"lr": cfg.lr, "sparse_lr": cfg.lr,
            **{k: params[k].default for k in table_class(method.split("+")[0]).tune_space}}


def _tune_domain(spec: tuple):
    from ray import tune

    kind, *args = spec
    if kind == "choice":
        return tune.choice(list(args))
    if kind == "uniform":
        return tune.uniform(*args)
    if kind == "loguniform":
        return tune.loguniform(*args)
    raise ValueError(f"tune space entry {spec!r}: kind must be choice, uniform or loguniform")


def _search_trial(config: dict[str, Any], template: Trial, cfg: BenchConfig, data: CTRDataset) -> None:
    """One search trial (a Ray Tune function trainable): trains ``template`` at ``config`` and reports
    each validation AUC; a point the budget cannot reach, or that fails, reports AUC 0."""
    import torch
    from ray import tune

    torch.set_num_threads(cfg.threads or 1)
    trial = dataclasses.replace(template, tuned=tuple(sorted(config.items())))
    reported = []

    def report(h: dict[str, Any]) -> None:
        reported.append(h["valid_auc"])
        tune.report({"valid_auc": h["valid_auc"] if math.isfinite(h["valid_auc"]) else 0.0})

    try:
        status, _, reason = run_trial(trial, dataclasses.replace(cfg, progress=False), data, on_eval=report)
    except Exception as e:  # a point that breaks training (diverged, bad combination) loses the search
        status, reason = "failed", f"{type(e).__name__}: {e}"
    if status != "ok" and not reported:
        tune.report({"valid_auc": 0.0, "reason": str(reason)[:300]})


def _search(template: Trial, cfg: BenchConfig, data: CTRDataset, space: dict[str, tuple],
            settings: dict[str, Any]) -> dict[str, Any]:
    """Run one search; returns ``{"chosen", "valid_auc", "trials"}`` (every trial's point and best AUC)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    from embpress.bench.ray_executor import RayExecutor, _in_memory

    RayExecutor(cpus_per_trial=cfg.threads or 1)._connect()
    evals = settings["max_evaluations"]
    trainable = tune.with_resources(tune.with_parameters(_search_trial, template=template, cfg=cfg,
                                                         data=_in_memory(data)), {"cpu": cfg.threads or 1})
    with tempfile.TemporaryDirectory(prefix="embpress-tune-") as storage:
        tuner = tune.Tuner(
            trainable, param_space={k: _tune_domain(v) for k, v in space.items()},
            tune_config=tune.TuneConfig(
                metric="valid_auc", mode="max", num_samples=settings["trials"],
                scheduler=ASHAScheduler(max_t=evals, grace_period=settings["grace_evaluations"],
                                        reduction_factor=SCHEDULER["reduction_factor"]),
                search_alg=BasicVariantGenerator(points_to_evaluate=[settings["first_point"]],
                                                  random_state=settings["search_seed"])),
            run_config=tune.RunConfig(storage_path=storage, name="search", verbose=0))
        grid = tuner.fit()
        trials = []
        for r in grid:
            df = r.metrics_dataframe
            best = float(df["valid_auc"].max()) if df is not None and "valid_auc" in df else 0.0
            trials.append({"point": {k: r.config[k] for k in space}, "best_valid_auc": best,
                           "evaluations": 0 if df is None else len(df), "error": None if r.error is None
                           else str(r.error).splitlines()[0][:300]})
    if not trials or max(t["best_valid_auc"] for t in trials) <= 0.0:
        return {"chosen": None, "valid_auc": None, "trials": trials}
    top = max(trials, key=lambda t: t["best_valid_auc"])
    return {"chosen": top["point"], "valid_auc": top["best_valid_auc"], "trials": trials}


def _read_searches(path: Path) -> dict[str, dict[str, Any]]:
    out = {}
    if path.exists():
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                out[rec["key"]] = rec
            except (json.JSONDecodeError, KeyError, TypeError):
                if i == len(path.read_text().splitlines()) and not path.read_text().endswith("\n"):
                    continue  # a torn last line: an append that was killed; the search runs again
                raise ValueError(f"{path}:{i}: not a search record of embpress bench --tune; delete the "
                                 "line (that search runs again)") from None
    return out


def _append(path: Path, rec: dict[str, Any]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, (canonical_json(rec) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def tuned_trials(trials: Sequence[Trial], cfg: BenchConfig, data: CTRDataset, data_fp: dict[str, Any], out: Path,
                 *, log: Callable[[str], None] = print) -> list[Trial]:
    """``trials`` with each compressed (model, method, ratio)'s seeds at its searched best point.

    Reference trials (``full``, ``noid``) are returned as they are. A search whose every point
    failed or was unreachable leaves its trials at the defaults (said in the log).
    """
    path = out / TUNE_FILE
    out.mkdir(parents=True, exist_ok=True)
    done = _read_searches(path)
    chosen: dict[tuple[str, str, float], tuple[tuple[str, Any], ...] | None] = {}
    search_of: dict[tuple[str, str, float], tuple[tuple[str, Any], ...]] = {}
    result = []
    for t in trials:
        if _is_reference(t.method):
            result.append(t)
            continue
        group = (t.model, t.method, t.ratio)
        if group not in chosen:
            space = search_space(t.method)
            template = dataclasses.replace(t, seed=cfg.seeds[0])
            settings = {"trials": cfg.tune, "scheduler": SCHEDULER, "metric": "valid_auc",
                        "space": {k: list(v) for k, v in space.items()}, "search_seed": cfg.seeds[0],
                        "first_point": default_point(t.method, cfg),
                        "grace_evaluations": SCHEDULER["grace_epochs"] * template.train_config(cfg).evals_per_epoch,
                        "max_evaluations": 4 * template.epochs(cfg) * template.train_config(cfg).evals_per_epoch}
            base = trial_config(template, cfg, data_fp)
            key = fingerprint({"untuned": {k: v for k, v in base.items() if k != "seed"}, "search": settings})[:16]
            rec = done.get(key)
            if rec is None:
                log(f"tuning {t.model} {t.method}@{t.ratio:g}x: {cfg.tune} trials (ASHA, validation AUC) ...")
                found = _search(template, cfg, data, space, settings)
                rec = {"key": key, "dataset": t.dataset, "model": t.model, "method": t.method, "ratio": t.ratio,
                       "settings": settings, **found}
                _append(path, rec)
            if rec["chosen"] is None:
                log(f"tuning {t.model} {t.method}@{t.ratio:g}x: no point trained (all failed or unreachable); "
                    "its seeds run at the defaults")
                chosen[group] = None
            else:
                chosen[group] = tuple(sorted(rec["chosen"].items()))
                log(f"tuned {t.model} {t.method}@{t.ratio:g}x: validation AUC {rec['valid_auc']:.4f} at "
                    + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in chosen[group]))
            search_of[group] = tuple(sorted((k, v) for k, v in settings.items()))
        if chosen[group] is None:
            result.append(t)
        else:
            result.append(dataclasses.replace(t, tuned=chosen[group], search=search_of[group]))
    return result
