"""The CTR benchmark grid: datasets x models x methods x ratios x seeds, one record per trial.

Records are appended to ``results.jsonl`` as each trial ends, so an interrupted run resumes by
skipping the trials already recorded. A method that cannot reach a ratio is recorded as
``status="unreachable"`` (with the reason) and reported as such; it is not a failure of the run.
"""

from __future__ import annotations

import inspect
import socket
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from embpress.bench.records import (
    append_record,
    array_fingerprint,
    fingerprint,
    make_record,
    open_run,
    trial_id,
)
from embpress.data.schema import CTRDataset
from embpress.models import CTRModel, build_model, registered_models
from embpress.progress import progress_task
from embpress.tables import BudgetError, Ratio, build_table, table_class
from embpress.tables.base import CompressedTable, table_hparams
from embpress.train import TrainConfig, Trainer

DEFAULT_METHODS = ("full", "noid", "hash", "qr", "unified", "tt", "int8")
DEFAULT_RATIOS = (2.0, 10.0, 100.0)
DEFAULT_EPOCHS = {"synthetic": 1, "criteo": 1, "avazu": 1, "movielens": 30, "libfm": 30}
"""Epochs per stage when the grid does not set them: large click logs are trained for one epoch as
in the CTR literature; small sets train longer and early stopping on validation AUC decides."""

MEASURED_METRICS = ("train_samples_per_s", "train_seconds", "infer_lookups_per_s", "stage_seconds", "wall_seconds",
                    "peak_rss_bytes", "peak_rss_scope", "host")
"""Metrics that measure the machine (speed, peak memory): they vary between runs of one trial; everything
else must not."""


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark grid: every method at every ratio on every dataset, model and seed."""

    datasets: tuple[str, ...] = ("synthetic",)
    models: tuple[str, ...] = ("dlrm",)
    methods: tuple[str, ...] = DEFAULT_METHODS
    ratios: tuple[float, ...] = DEFAULT_RATIOS
    seeds: tuple[int, ...] = (0, 1, 2)
    dim: int = 16
    epochs: int | None = None
    batch_size: int = 2048
    lr: float = 3e-3
    threads: int | None = None
    progress: bool = True
    sparse_optimizer: str = "adam"
    """The embedding rows' optimizer (``TrainConfig.sparse_optimizer``)."""
    sparse_lr: float | None = None
    """The embedding rows' learning rate; None: ``lr``."""
    tune: int | None = None
    """Search each (dataset, model, method, ratio)'s learning rates and declared hyper-parameters with
    this many Ray Tune trials (ASHA, validation AUC) before running its seeds; None: the defaults."""

    def __post_init__(self) -> None:
        for name in ("datasets", "models", "methods", "ratios", "seeds"):
            values = getattr(self, name)
            if not values:
                raise ValueError(f"--{name}: the list is empty; give at least one value")
            dup = sorted({str(v) for v in values if list(values).count(v) > 1})
            if dup:
                raise ValueError(f"--{name}: {', '.join(dup)} given more than once; give each value once")
        for r in self.ratios:
            Ratio(r)  # validates
        for m in self.methods:
            spec = m.split("+")[0]
            table_class(spec)  # unknown method -> ValueError listing the registered ones
        for m in self.models:
            if m not in registered_models():
                raise ValueError(f"unknown model {m!r}; available: {registered_models()}")
        for s in self.seeds:
            if isinstance(s, bool) or not isinstance(s, int | np.integer) or s < 0:
                raise ValueError(f"--seeds: {s!r} is not a non-negative int")
        for name, low in (("dim", 1), ("epochs", 1), ("batch_size", 1), ("threads", 1), ("tune", 1)):
            v = getattr(self, name)
            if v is None and name in ("epochs", "threads", "tune"):
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"--{name.replace('_', '-')} must be an int >= {low}, got {v!r}")
        from embpress.optim import SPARSE_OPTIMIZERS

        if self.sparse_optimizer not in SPARSE_OPTIMIZERS:
            raise ValueError(f"--sparse-opt must be one of {sorted(SPARSE_OPTIMIZERS)}, got {self.sparse_optimizer!r}")
        if self.sparse_lr is not None and not (isinstance(self.sparse_lr, int | float)
                                               and 0 < self.sparse_lr < float("inf")):
            raise ValueError(f"--sparse-lr must be a positive number, got {self.sparse_lr!r}")
        if not (isinstance(self.lr, int | float) and 0 < self.lr < float("inf")):
            raise ValueError(f"--lr must be a positive number, got {self.lr!r}")


@dataclass(frozen=True)
class Trial:
    dataset: str
    model: str
    method: str
    ratio: float
    seed: int
    tuned: tuple[tuple[str, Any], ...] = ()
    """The values a search chose (``lr``, ``sparse_lr`` and table hyper-parameters), sorted by name;
    empty for a trial at the defaults."""
    search: tuple[tuple[str, Any], ...] = ()
    """The search's own settings (trials, scheduler, space, seed): part of a tuned trial's identity."""

    def table_hparams(self) -> dict[str, Any]:
        return {k: v for k, v in self.tuned if k not in ("lr", "sparse_lr")}

    def epochs(self, cfg: BenchConfig) -> int:
        """The grid's epochs, else the dataset format's default (:data:`DEFAULT_EPOCHS`)."""
        if cfg.epochs is not None:
            return cfg.epochs
        return DEFAULT_EPOCHS.get(self.dataset.split(":")[0], 1)

    def label(self, name: str | None = None) -> str:
        """``DATASET MODEL METHOD@RATIOx seed S``, with the dataset's short ``name`` when given."""
        tuned = " (tuned)" if self.tuned else ""
        return f"{name or self.dataset} {self.model} {self.method}@{self.ratio:g}x{tuned} seed {self.seed}"

    def train_config(self, cfg: BenchConfig) -> TrainConfig:
        t = dict(self.tuned)
        return TrainConfig(epochs=self.epochs(cfg), batch_size=cfg.batch_size, lr=t.get("lr", cfg.lr),
                           sparse_lr=t.get("sparse_lr", cfg.lr if cfg.sparse_lr is None else cfg.sparse_lr),
                           seed=self.seed, progress=cfg.progress,
                           sparse_optimizer=cfg.sparse_optimizer)


def plan_trials(cfg: BenchConfig) -> list[Trial]:
    """Every trial of the grid; reference methods (``full``, ``noid``) run once per seed at ratio 1."""
    trials = []
    for ds in cfg.datasets:
        for model in cfg.models:
            for seed in cfg.seeds:
                for method in cfg.methods:
                    if _is_reference(method):
                        trials.append(Trial(ds, model, method, 1.0, seed))
                        continue
                    for r in cfg.ratios:
                        trials.append(Trial(ds, model, method, float(r), seed))
    return trials


def _is_reference(method: str) -> bool:
    return table_class(method.split("+")[0]).reference and "+" not in method


def _defaults(params: dict[str, inspect.Parameter]) -> dict[str, Any]:
    """Default values of keyword parameters (``repr`` where JSON has no form for them)."""
    out = {}
    for name, p in sorted(params.items()):
        v = p.default
        out[name] = v if v is None or isinstance(v, bool | int | float | str) else repr(v)
    return out


def _model_hparams(name: str) -> dict[str, Any]:
    todo, classes = [CTRModel], {}
    while todo:
        for sub in todo.pop().__subclasses__():
            classes[getattr(sub, "name", None)] = sub
            todo.append(sub)
    params = inspect.signature(classes[name].__init__).parameters
    return _defaults({k: p for k, p in params.items()
                      if p.kind == p.KEYWORD_ONLY and k not in ("table", "num_dense")})


def dataset_fingerprint(data: CTRDataset) -> dict[str, Any]:
    """What identifies the data a trial ran on: for a file dataset, the sha256 of every source file's
    bytes and the processing options (from the cache's metadata); otherwise (synthetic, in memory)
    a sha256 of every array of every split and of the fields' training counts."""
    info = data.info
    sources = info.get("sources")
    if sources and all(isinstance(s, dict) and s.get("sha256") for s in sources):
        from embpress.data.preprocess import PREPROCESS_VERSION

        return {"sources_sha256": [s["sha256"] for s in sources], "format": info.get("format"),
                "min_count": info.get("min_count"), "split_seed": info.get("seed"), "split": info.get("split"),
                "preprocess": PREPROCESS_VERSION}
    parts = [array_fingerprint(a) for s in (data.train, data.valid, data.test) for a in (s.dense, s.sparse, s.label)]
    parts += [array_fingerprint(np.asarray(f.counts)) for f in data.fields]
    return {"content_sha256": fingerprint(parts),
            "rows": [len(data.train), len(data.valid), len(data.test)],
            "num_embeddings": [f.num_embeddings for f in data.fields]}


def trial_config(trial: Trial, cfg: BenchConfig, data_fingerprint: dict[str, Any]) -> dict[str, Any]:
    """A trial's identity: every setting that can change its record, and the data's fingerprint."""
    method = trial.method
    base = table_class(method.split("+")[0])
    tcfg = asdict(trial.train_config(cfg))
    for name in ("progress", "seed", "epochs", "batch_size", "lr"):  # progress changes nothing; the rest is above
        del tcfg[name]
    if tcfg["sparse_optimizer"] == "adam":  # the setting every record before it was added trained with:
        del tcfg["sparse_optimizer"]        # left out, so those records keep their identity
    config = {
        "dataset": trial.dataset, "data": data_fingerprint, "model": trial.model,
        "model_hparams": _model_hparams(trial.model), "method": method, "ratio": trial.ratio,
        "hparams": {**_defaults(table_hparams(base)), **trial.table_hparams()}, "seed": trial.seed, "dim": cfg.dim,
        "epochs": trial.epochs(cfg), "batch_size": cfg.batch_size, "lr": dict(trial.tuned).get("lr", cfg.lr),
        "train": tcfg, "threads": cfg.threads,
    }
    if trial.tuned:  # the chosen values are above; how they were chosen, and from what, here
        config["tune"] = {**dict(trial.search), "base_lr": cfg.lr, "chosen": dict(trial.tuned)}
    return config


def _data_metrics(data: CTRDataset) -> dict[str, Any]:
    return {"dataset_name": data.name, "train_rows": len(data.train), "num_fields": len(data.fields),
            "vocab_bytes": data.vocab_bytes}


def measure_lookups_per_s(table: CompressedTable, ids: torch.Tensor, repeats: int = 3) -> float:
    """Inference throughput of the table alone: ids looked up per second (eval mode, no grad)."""
    was = table.training
    table.eval()
    with torch.no_grad():
        table(ids[:256])  # warm-up
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            table(ids)
            best = min(best, time.perf_counter() - t0)
    table.train(was)
    return ids.numel() / best


_STATUS = Path("/proc/self/status")


def reset_peak_rss() -> str:
    """Reset the kernel's peak-RSS mark of this process (Linux ``clear_refs`` 5); returns the scope
    :func:`peak_rss_bytes` then measures: ``"trial"`` after a reset, ``"process"`` where it failed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return "trial"
    except OSError:
        return "process"


def peak_rss_bytes() -> int:
    """Peak resident memory of this process since the last :func:`reset_peak_rss` (``VmHWM``), or
    over its life (``ru_maxrss``) where ``/proc`` is not available."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def run_trial(trial: Trial, cfg: BenchConfig, data: CTRDataset,
              on_eval: Callable[[dict[str, Any]], None] | None = None) -> tuple[str, dict[str, Any], str | None]:
    """Build, train and measure one trial: ``(status, metrics, reason)``, status ok or unreachable.
    ``on_eval`` sees each validation evaluation (a search reports them to its scheduler).

    Memory is recorded twice: ``train_state_bytes`` (the table's tensors, optimizer moments and dense
    gradients, counted; see :meth:`CompressedTable.train_state_bytes`) and ``peak_rss_bytes``, the
    process's measured peak resident memory over the trial (data pages it touched included).
    """
    rss_scope = reset_peak_rss()
    metrics = _data_metrics(data)
    torch.manual_seed(trial.seed)
    spec = trial.method
    try:
        table = build_table(spec, fields=data.fields, dim=cfg.dim,
                            budget=None if _is_reference(spec) else Ratio(trial.ratio), **trial.table_hparams())
    except BudgetError as e:
        return "unreachable", metrics, str(e)
    model = build_model(trial.model, table=table, num_dense=data.num_dense)
    result = Trainer(model, data, trial.train_config(cfg), on_eval=on_eval).fit()
    serving = table.serving_bytes()
    ids = torch.from_numpy(data.test.sparse[:16384].astype("int64"))
    flops = getattr(table, "flops_per_lookup", None)
    return "ok", {
        **metrics, "full_bytes": table.full_bytes, "serving_bytes": serving,
        "achieved_ratio": table.full_bytes / serving, "budget_bytes": table.max_bytes,
        "auc": result.test_auc, "logloss": result.test_logloss, "valid_auc": result.valid_auc,
        "train_samples_per_s": result.train_samples_per_s, "train_seconds": result.train_seconds,
        "infer_lookups_per_s": measure_lookups_per_s(table, ids),
        "flops_per_lookup": flops() if callable(flops) else None,
        "stage_seconds": {s.name: s.seconds for s in result.stages},
        "table": repr(table.extra_repr()),
        "train_state_bytes": result.train_state_bytes,
        "peak_rss_bytes": peak_rss_bytes(), "peak_rss_scope": rss_scope,
    }, None


@dataclass
class BenchOutcome:
    records: list[dict[str, Any]] = field(default_factory=list)
    ran: int = 0
    skipped: int = 0
    failed: list[str] = field(default_factory=list)


def execute_trial(trial: Trial, cfg: BenchConfig, data: CTRDataset) -> tuple[str, dict[str, Any], str | None]:
    """:func:`run_trial` with its failure caught: ``(status, metrics, reason)``, status ok, unreachable or
    failed (the error and a short traceback), plus ``wall_seconds`` and the ``host`` that ran it."""
    t0 = time.perf_counter()
    try:
        status, metrics, reason = run_trial(trial, cfg, data)
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as e:  # record and go on: one broken method must not sink the grid
        status, metrics = "failed", {**_data_metrics(data), "traceback": traceback.format_exc(limit=5)}
        reason = f"{type(e).__name__}: {e}"
    metrics["wall_seconds"] = time.perf_counter() - t0
    metrics["host"] = socket.gethostname()
    return status, metrics, reason


Executor = Callable[[Sequence[tuple[Trial, dict[str, Any]]], BenchConfig, CTRDataset],
                    Iterator[tuple[Trial, dict[str, Any], str, dict[str, Any], str | None]]]
"""Runs a dataset's pending trials and yields ``(trial, config, status, metrics, reason)`` as each ends,
in any order; the driver alone writes the records."""


def serial_executor(todo: Sequence[tuple[Trial, dict[str, Any]]], cfg: BenchConfig, data: CTRDataset):
    """The trials one after another in this process."""
    for t, config in todo:
        yield (t, config, *execute_trial(t, cfg, data))


def run_bench(cfg: BenchConfig, out: str | Path, *, load: Callable[[str], CTRDataset],
              log: Callable[[str], None] = print, executor: Executor | None = None) -> BenchOutcome:
    """Run every trial of ``cfg`` not yet recorded in ``out/results.jsonl``, appending records.

    A trial is skipped only when a record with its whole configuration (:func:`trial_config`,
    data fingerprint included) is already there. ``load`` maps a dataset spec to a
    :class:`CTRDataset` (called once per dataset, also on resume: the fingerprint comes from the
    data). A trial that raises is recorded as ``status="failed"`` with the error and retried on the
    next run. ``executor`` runs the pending trials (default :func:`serial_executor`; see
    :func:`embpress.bench.ray_executor.ray_executor`); which one ran a trial is not part of its
    identity, and this process alone appends the records, in the order the trials end.

    Raises:
        ValueError: ``out`` is a file or holds records of another kind, or damaged records (file:line).
    """
    path, records = open_run(out, "ctr")
    done = {r["trial"] for r in records if r["status"] == "ok"}
    # "Unreachable" depends on the code that sized the table, and checking it again costs no training:
    # such trials are rebuilt on resume, and recorded again only if the verdict changed.
    unreachable = {r["trial"]: r["reason"] for r in records if r["status"] == "unreachable"}
    outcome = BenchOutcome()
    executor = executor or serial_executor
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    by_dataset: dict[str, list[Trial]] = {}
    for t in plan_trials(cfg):
        by_dataset.setdefault(t.dataset, []).append(t)
    for ds, ds_trials in by_dataset.items():
        data = load(ds)
        fp = dataset_fingerprint(data)
        if cfg.tune:
            from embpress.bench.tune import tuned_trials

            ds_trials = tuned_trials(ds_trials, cfg, data, fp, Path(out), log=log)
        todo = []
        for t in ds_trials:
            config = trial_config(t, cfg, fp)
            if trial_id(config) in done:
                outcome.skipped += 1
            else:
                todo.append((t, config))
        if not todo:
            continue
        log(data.summary())
        # the serial trainer shows its own bars (rich allows one live display at a time); a parallel
        # executor's workers show none, so the grid gets one bar
        grid_bar = cfg.progress and executor is not serial_executor
        with progress_task(f"{data.name}: trials", len(todo), enabled=grid_bar) as advance:
            for i, (t, config, status, metrics, reason) in enumerate(executor(todo, cfg, data), 1):
                advance(1)
                if status == "failed":
                    outcome.failed.append(f"{t.label(data.name)}: {reason}")
                if status == "unreachable" and unreachable.get(trial_id(config)) == reason:
                    outcome.skipped += 1
                    continue
                rec = make_record("ctr", config, status=status, metrics=metrics, reason=reason)
                append_record(path, rec)
                outcome.records.append(rec)
                outcome.ran += 1
                if status == "ok":
                    log(f"[{i}/{len(todo)}] {t.label(data.name)}: AUC {metrics['auc']:.4f}, "
                        f"{metrics['serving_bytes']:,} B ({metrics['achieved_ratio']:.1f}x), "
                        f"{metrics['train_samples_per_s']:,.0f} samples/s, {metrics['wall_seconds']:.1f} s")
                else:
                    log(f"[{i}/{len(todo)}] {t.label(data.name)}: {status}: {str(reason).splitlines()[0]}")
    return outcome


def parse_list(text: str | None, kind: Callable[[str], Any], what: str) -> tuple[Any, ...] | None:
    """``"10,100"`` -> ``(10.0, 100.0)``; None stays None (the option was not given).

    Raises:
        ValueError: an empty list or element, or an element ``kind`` cannot parse, naming the option.

    >>> parse_list("10, 100", float, "ratios")
    (10.0, 100.0)
    >>> parse_list(" ,", float, "ratios")
    Traceback (most recent call last):
    ...
    ValueError: --ratios: empty list ' ,'; give comma-separated values, e.g. --ratios 10,100
    """
    if text is None:
        return None
    items = [s.strip() for s in text.split(",")]
    example = {"ratios": "10,100", "seeds": "0,1,2"}.get(what, "a,b")
    if not any(items):
        raise ValueError(f"--{what}: empty list {text!r}; give comma-separated values, e.g. --{what} {example}")
    if not all(items):
        raise ValueError(f"--{what}: empty element in {text!r}; give comma-separated values, e.g. --{what} {example}")
    out = []
    for s in items:
        try:
            out.append(kind(s))
        except ValueError:
            raise ValueError(f"--{what}: {s!r} in {text!r} is not a{'n' if kind is int else ''} "
                             f"{kind.__name__}") from None
    return tuple(out)


def resolve_methods(names: Sequence[str]) -> tuple[str, ...]:
    """Expand ``all`` to every registered method (references included)."""
    from embpress.tables import registered_tables

    out: list[str] = []
    for n in names:
        out.extend(registered_tables() if n == "all" else [n])
    return tuple(dict.fromkeys(out))
