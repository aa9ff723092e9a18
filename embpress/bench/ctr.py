"""The CTR benchmark grid: datasets x models x methods x ratios x seeds, one record per trial.

Records are appended to ``results.jsonl`` as each trial ends, so an interrupted run resumes by
skipping the trials already recorded. A method that cannot reach a ratio is recorded as
``status="unreachable"`` (with the reason) and reported as such; it is not a failure of the run.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from embpress.bench.records import append_record, provenance, read_records, record_key, recorded_keys
from embpress.data.schema import CTRDataset
from embpress.models import build_model
from embpress.tables import BudgetError, Ratio, build_table, table_class
from embpress.tables.base import CompressedTable
from embpress.train import TrainConfig, Trainer

DEFAULT_METHODS = ("full", "noid", "hash", "qr", "unified", "tt", "int8")
DEFAULT_RATIOS = (2.0, 10.0, 100.0)
DEFAULT_EPOCHS = {"synthetic": 1, "criteo": 1, "avazu": 1, "movielens": 30, "libfm": 30}
"""Epochs per stage when the grid does not set them: large click logs are trained for one epoch as
in the CTR literature; small sets train longer and early stopping on validation AUC decides."""

TRIAL_KEYS = ("dataset", "model", "method", "ratio", "seed", "dim", "epochs", "batch_size", "lr")


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

    def __post_init__(self) -> None:
        for name in ("datasets", "models", "methods", "ratios", "seeds"):
            if not getattr(self, name):
                raise ValueError(f"bench: {name} must not be empty")
        for r in self.ratios:
            Ratio(r)  # validates
        for m in self.methods:
            spec = m.split("+")[0]
            table_class(spec)  # unknown method -> ValueError listing the registered ones


@dataclass(frozen=True)
class Trial:
    dataset: str
    model: str
    method: str
    ratio: float
    seed: int

    def epochs(self, cfg: BenchConfig) -> int:
        """The grid's epochs, else the dataset format's default (:data:`DEFAULT_EPOCHS`)."""
        if cfg.epochs is not None:
            return cfg.epochs
        return DEFAULT_EPOCHS.get(self.dataset.split(":")[0], 1)

    def label(self, name: str | None = None) -> str:
        """``DATASET MODEL METHOD@RATIOx seed S``, with the dataset's short ``name`` when given."""
        return f"{name or self.dataset} {self.model} {self.method}@{self.ratio:g}x seed {self.seed}"


def plan_trials(cfg: BenchConfig) -> list[Trial]:
    """Every trial of the grid; reference methods (``full``, ``noid``) run once per seed at ratio 1."""
    trials = []
    for ds in cfg.datasets:
        for model in cfg.models:
            for seed in cfg.seeds:
                for method in cfg.methods:
                    if table_class(method.split("+")[0]).reference and "+" not in method:
                        trials.append(Trial(ds, model, method, 1.0, seed))
                        continue
                    for r in cfg.ratios:
                        trials.append(Trial(ds, model, method, float(r), seed))
    return trials


def _base_record(trial: Trial, cfg: BenchConfig, data: CTRDataset) -> dict[str, Any]:
    return {
        **asdict(trial), "dim": cfg.dim, "epochs": trial.epochs(cfg), "batch_size": cfg.batch_size,
        "lr": cfg.lr, "dataset_name": data.name,
        "train_rows": len(data.train), "num_fields": len(data.fields),
        "vocab_bytes": data.vocab_bytes, **provenance(), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


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


def run_trial(trial: Trial, cfg: BenchConfig, data: CTRDataset) -> dict[str, Any]:
    """Build, train and measure one trial; returns its record (status ok or unreachable).

    Memory is recorded twice: ``train_state_bytes`` (the table's tensors, optimizer moments and dense
    gradients, counted; see :meth:`CompressedTable.train_state_bytes`) and ``peak_rss_bytes``, the
    process's measured peak resident memory over the trial (data pages it touched included).
    """
    rss_scope = reset_peak_rss()
    rec = _base_record(trial, cfg, data)
    torch.manual_seed(trial.seed)
    spec = trial.method
    reference = table_class(spec.split("+")[0]).reference and "+" not in spec
    try:
        table = build_table(spec, fields=data.fields, dim=cfg.dim, budget=None if reference else Ratio(trial.ratio))
    except BudgetError as e:
        return {**rec, "status": "unreachable", "reason": str(e)}
    model = build_model(trial.model, table=table, num_dense=data.num_dense)
    tcfg = TrainConfig(epochs=trial.epochs(cfg), batch_size=cfg.batch_size, lr=cfg.lr, sparse_lr=cfg.lr,
                       seed=trial.seed, progress=cfg.progress)
    result = Trainer(model, data, tcfg).fit()
    serving = table.serving_bytes()
    ids = torch.from_numpy(data.test.sparse[:16384].astype("int64"))
    flops = getattr(table, "flops_per_lookup", None)
    return {
        **rec, "status": "ok", "full_bytes": table.full_bytes, "serving_bytes": serving,
        "achieved_ratio": table.full_bytes / serving, "budget_bytes": table.max_bytes,
        "auc": result.test_auc, "logloss": result.test_logloss, "valid_auc": result.valid_auc,
        "train_samples_per_s": result.train_samples_per_s, "train_seconds": result.train_seconds,
        "infer_lookups_per_s": measure_lookups_per_s(table, ids),
        "flops_per_lookup": flops() if callable(flops) else None,
        "stage_seconds": {s.name: s.seconds for s in result.stages},
        "table": repr(table.extra_repr()),
        "train_state_bytes": result.train_state_bytes,
        "peak_rss_bytes": peak_rss_bytes(), "peak_rss_scope": rss_scope,
    }


@dataclass
class BenchOutcome:
    records: list[dict[str, Any]] = field(default_factory=list)
    ran: int = 0
    skipped: int = 0
    failed: list[str] = field(default_factory=list)


def run_bench(cfg: BenchConfig, out: str | Path, *, load: Callable[[str], CTRDataset],
              log: Callable[[str], None] = print) -> BenchOutcome:
    """Run every trial of ``cfg`` not yet recorded in ``out/results.jsonl``, appending records.

    ``load`` maps a dataset spec to a :class:`CTRDataset` (called once per dataset). A trial that
    raises is recorded as ``status="failed"`` with the error and retried on the next run.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.jsonl"
    records = read_records(path)
    done = recorded_keys((r for r in records if r.get("status") == "ok"), TRIAL_KEYS)
    # "Unreachable" depends on the code that sized the table, and checking it again costs no training:
    # such trials are rebuilt on resume, and recorded again only if the verdict changed.
    unreachable = {record_key(r, TRIAL_KEYS): r.get("reason") for r in records if r.get("status") == "unreachable"}
    outcome = BenchOutcome()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    trials = plan_trials(cfg)
    by_dataset: dict[str, list[Trial]] = {}
    for t in trials:
        by_dataset.setdefault(t.dataset, []).append(t)
    for ds, ds_trials in by_dataset.items():
        todo = []
        for t in ds_trials:
            key = record_key({**asdict(t), "dim": cfg.dim, "epochs": t.epochs(cfg), "batch_size": cfg.batch_size,
                              "lr": cfg.lr}, TRIAL_KEYS)
            if key in done:
                outcome.skipped += 1
            else:
                todo.append(t)
        if not todo:
            continue
        data = load(ds)  # unreachable trials are re-checked here too; they need the fields
        log(data.summary())
        for i, t in enumerate(todo, 1):
            t0 = time.perf_counter()
            try:
                rec = run_trial(t, cfg, data)
            except (KeyboardInterrupt, MemoryError):
                raise
            except Exception as e:  # record and go on: one broken method must not sink the grid
                rec = {**_base_record(t, cfg, data), "status": "failed",
                       "reason": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=5)}
                outcome.failed.append(f"{t.label(data.name)}: {type(e).__name__}: {e}")
            rec["wall_seconds"] = time.perf_counter() - t0
            key = record_key(rec, TRIAL_KEYS)
            if rec["status"] == "unreachable" and unreachable.get(key) == rec["reason"]:
                outcome.skipped += 1
                continue
            append_record(path, rec)
            outcome.records.append(rec)
            outcome.ran += 1
            if rec["status"] == "ok":
                log(f"[{i}/{len(todo)}] {t.label(data.name)}: AUC {rec['auc']:.4f}, {rec['serving_bytes']:,} B "
                    f"({rec['achieved_ratio']:.1f}x), {rec['train_samples_per_s']:,.0f} samples/s, "
                    f"{rec['wall_seconds']:.1f} s")
            else:
                log(f"[{i}/{len(todo)}] {t.label(data.name)}: {rec['status']}: {rec['reason'].splitlines()[0]}")
    return outcome


def parse_list(text: str | None, kind: Callable[[str], Any], what: str) -> tuple[Any, ...] | None:
    """``"10,100"`` -> ``(10.0, 100.0)``; a clear error for a bad element."""
    if text is None:
        return None
    items = [s.strip() for s in text.split(",") if s.strip()]
    try:
        return tuple(kind(s) for s in items)
    except ValueError:
        raise ValueError(f"--{what}: could not parse {text!r} as a comma-separated list") from None


def resolve_methods(names: Sequence[str]) -> tuple[str, ...]:
    """Expand ``all`` to every registered method (references included)."""
    from embpress.tables import registered_tables

    out: list[str] = []
    for n in names:
        out.extend(registered_tables() if n == "all" else [n])
    return tuple(dict.fromkeys(out))
