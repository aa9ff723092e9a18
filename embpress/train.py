"""One trainer for every method: runs the table's stages, early-stops on validation AUC, evaluates.

Stages come from ``model.table.stages()`` as data (:class:`embpress.tables.Stage`); the trainer
has no method-specific branches. Sparse-gradient parameters get RowSparseAdam (SparseAdam's update, faster), the rest Adam, and
bilevel stages update ``table.arch_parameters()`` on validation batches.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from embpress.atomic import atomic_open
from embpress.data.schema import CTRDataset, Split
from embpress.distributed import DataParallel
from embpress.models.base import CTRModel
from embpress.optim import SPARSE_OPTIMIZERS, RowSparseAdam
from embpress.tables.base import ParamGroup, Stage, StageContext


@dataclass(frozen=True)
class TrainConfig:
    """Training hyper-parameters shared by every method.

    ``epochs`` is the default per stage (a stage may set its own); ``patience`` is the number of
    evaluations without improvement of validation AUC before a stage stops; ``evals_per_epoch``
    evaluates that many times per epoch (CTR models often peak within the first epoch).
    """

    epochs: int = 2
    batch_size: int = 2048
    lr: float = 3e-3
    sparse_lr: float = 3e-3
    arch_lr: float = 3e-3
    weight_decay: float = 0.0
    patience: int = 2
    evals_per_epoch: int = 2
    eval_batch_size: int = 16384
    seed: int = 0
    max_steps_per_epoch: int | None = None
    progress: bool = True
    sparse_optimizer: str = "adam"
    """Optimizer of the sparse-gradient (embedding) parameters at ``sparse_lr``: ``"adam"`` (lazy
    Adam, :class:`~embpress.optim.RowSparseAdam`) or ``"rowwise_adagrad"`` (one accumulator a row,
    :class:`~embpress.optim.RowSparseRowwiseAdagrad`, TorchRec's default; it takes larger rates)."""

    def __post_init__(self) -> None:
        if self.sparse_optimizer not in SPARSE_OPTIMIZERS:
            raise ValueError(f"TrainConfig.sparse_optimizer must be one of {sorted(SPARSE_OPTIMIZERS)}, "
                             f"got {self.sparse_optimizer!r}")
        for name in ("epochs", "batch_size", "patience", "evals_per_epoch", "eval_batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < (0 if name == "epochs" else 1):
                raise ValueError(f"TrainConfig.{name} must be a positive int, got {v!r}")
        for name in ("lr", "sparse_lr", "arch_lr"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and v > 0 and math.isfinite(v)):
                raise ValueError(f"TrainConfig.{name} must be a positive number, got {v!r}")


@dataclass
class StageReport:
    name: str
    seconds: float
    epochs: float
    samples: int
    best_valid_auc: float | None


@dataclass
class TrainResult:
    """What a run measured: test metrics at the best validation point, throughput, stage times."""

    valid_auc: float
    test_auc: float
    test_logloss: float
    train_samples_per_s: float
    train_seconds: float
    train_state_bytes: int = 0
    """The largest ``table.train_state_bytes()`` over the stages (at each stage's start and end)."""
    stages: list[StageReport] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)


def roc_auc(y: np.ndarray, p: np.ndarray) -> float:
    """Area under the ROC curve of scores ``p`` for binary labels ``y`` (ties count half), as
    scikit-learn's ``roc_auc_score`` computes it: the trapezoidal area under the (FPR, TPR) points
    at each distinct score. Written here because importing scikit-learn's metrics costs every
    training process about 140 MB of resident memory."""
    order = np.argsort(p, kind="stable")[::-1]
    y_sorted = y[order]
    p_sorted = p[order]
    del order  # temporaries freed as soon as they are used: at 1M rows each is 8 MB
    last = np.flatnonzero(p_sorted[1:] != p_sorted[:-1])  # last index of each distinct score ...
    del p_sorted
    last = np.append(last, len(y_sorted) - 1)  # ... and of the lowest
    tps = np.cumsum(y_sorted)[last]
    del y_sorted
    fps = (last + 1) - tps
    pos, neg = tps[-1], fps[-1]
    tpr, fpr = np.r_[0.0, tps / pos], np.r_[0.0, fps / neg]
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1])) / 2)


def log_loss(y: np.ndarray, p: np.ndarray, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy of probabilities ``p`` (clipped to ``[eps, 1 - eps]``) for labels ``y``."""
    p = np.clip(p, eps, 1 - eps)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))


def evaluate(model: CTRModel, split: Split, batch_size: int = 16384) -> tuple[float, float]:
    """``(AUC, log loss)`` of ``model`` on ``split`` (eval mode, no gradients)."""
    was_training = model.training
    model.eval()
    # one array written in place: a list of per-batch arrays, each allocated after the batch's
    # temporaries and kept to the end, ratchets the heap (measured: +6.5 MB a batch, 1.7 GB a pass)
    p = np.empty(len(split), dtype=np.float64)
    at = 0
    with torch.no_grad():
        for dense, ids, _ in split.batches(batch_size):
            p[at:at + len(ids)] = torch.sigmoid(model(dense, ids)).numpy()
            at += len(ids)
    model.train(was_training)
    y = np.asarray(split.label, dtype=np.float64)
    if len(y) == 0 or y.min() == y.max():
        warnings.warn("evaluation split has a single class: AUC is undefined", stacklevel=2)
        return float("nan"), float("nan")
    if not np.isfinite(p).all():
        raise FloatingPointError("model produced non-finite predictions during evaluation")
    return roc_auc(y, p), log_loss(y, p)


class _Optimizers:
    """RowSparseAdam for sparse-gradient parameters, Adam for the others, Adam for arch parameters,
    and one optimiser per :class:`ParamGroup` a stage names (its parameters leave the defaults)."""

    def __init__(self, model: CTRModel, cfg: TrainConfig, groups: Sequence[ParamGroup] = (),
                 train_head: bool = True) -> None:
        table = model.table
        grouped: dict[int, str] = {}
        for g in groups:
            for p in g.params:
                if id(p) in grouped:
                    raise ValueError(f"{table.method}: a parameter is in parameter groups {grouped[id(p)]!r} "
                                     f"and {g.name!r}; name each parameter once")
                grouped[id(p)] = g.name
        arch = {id(p) for p in table.arch_parameters()}
        sparse = [p for p in table.sparse_parameters() if p.requires_grad and id(p) not in grouped]
        sparse_ids = {id(p) for p in table.sparse_parameters()}
        trainable = model.parameters() if train_head else table.parameters()
        dense = [p for p in trainable
                 if p.requires_grad and id(p) not in sparse_ids and id(p) not in arch and id(p) not in grouped]
        self.opts: list[torch.optim.Optimizer] = []
        if sparse:
            self.opts.append(SPARSE_OPTIMIZERS[cfg.sparse_optimizer](sparse, lr=cfg.sparse_lr))
        if dense:
            self.opts.append(torch.optim.Adam(dense, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True))
        self.arch_opts: list[torch.optim.Optimizer] = []
        arch_params = [p for p in table.arch_parameters() if p.requires_grad and id(p) not in grouped]
        if arch_params:
            self.arch_opts.append(torch.optim.Adam(arch_params, lr=cfg.arch_lr))
        for g in groups:
            params = [p for p in g.params if p.requires_grad]
            if not params:
                continue
            lr = cfg.lr if g.lr is None else g.lr
            if g.optimizer == "sgd":
                opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=lr, weight_decay=g.weight_decay)
            elif any(id(p) in sparse_ids for p in params):
                if g.weight_decay:
                    raise ValueError(f"{table.method}: parameter group {g.name!r} has sparse-gradient parameters "
                                     "and weight_decay; Adam with weight decay needs dense gradients")
                opt = RowSparseAdam(params, lr=lr)
            else:
                opt = torch.optim.Adam(params, lr=lr, weight_decay=g.weight_decay)
            (self.arch_opts if g.bilevel else self.opts).append(opt)
        self.arch = bool(self.arch_opts)

    def zero_grad(self) -> None:
        for o in (*self.opts, *self.arch_opts):
            o.zero_grad(set_to_none=True)

    def step(self) -> None:
        for o in self.opts:
            o.step()

    def arch_step(self) -> None:
        for o in self.arch_opts:
            o.step()


def _loss(model: CTRModel, dense: torch.Tensor, ids: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    loss = nn.functional.binary_cross_entropy_with_logits(model(dense, ids), y)
    reg = model.table.regularizer()
    return loss if reg is None else loss + reg


def _infinite(split: Split, batch_size: int, gen: torch.Generator):
    while True:
        yield from split.batches(batch_size, shuffle=True, generator=gen)


class Trainer:
    """Runs every stage of ``model.table`` on ``data`` and reports test metrics at the best point."""

    def __init__(self, model: CTRModel, data: CTRDataset, config: TrainConfig | None = None,
                 log=None, on_eval=None) -> None:
        if tuple(f.num_embeddings for f in model.table.fields) != tuple(f.num_embeddings for f in data.fields):
            raise ValueError("the model's table was built for other fields than the dataset's")
        if model.num_dense != data.num_dense:
            raise ValueError(f"the model takes {model.num_dense} dense features, the data has {data.num_dense}")
        self.model = model
        self.data = data
        self.cfg = config or TrainConfig()
        self.gen = torch.Generator().manual_seed(self.cfg.seed)
        self.log = log or (lambda msg: None)
        self.on_eval = on_eval  # called with each validation evaluation's history entry (a tuner's scheduler)
        self.head_init = model.head_state()
        self.dp = DataParallel.current()

    def _backward(self, dense: torch.Tensor, ids: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Loss and gradients of one batch; under data parallelism (:mod:`embpress.distributed`) this
        process's slice of it, then the global batch's gradient combined from every process's."""
        if self.dp is None:
            loss = _loss(self.model, dense, ids, y)
            loss.backward()
            return loss
        rows = len(y)
        dense, ids, y = self.dp.shard(dense, ids, y)
        if len(y):
            loss = _loss(self.model, dense, ids, y)
            loss.backward()
        else:  # a batch smaller than the process count leaves this slice empty
            loss = torch.zeros(())
        self.dp.sync_gradients([p for p in self.model.parameters() if p.requires_grad], len(y), rows)
        return loss

    def _context(self) -> StageContext:
        return StageContext(
            model=self.model, table=self.model.table,
            evaluate=lambda: evaluate(self.model, self.data.valid, self.cfg.eval_batch_size)[0],
            train_batches=lambda: self.data.train.batches(self.cfg.batch_size, shuffle=True, generator=self.gen),
            valid_batches=lambda: self.data.valid.batches(self.cfg.batch_size, shuffle=True, generator=self.gen),
            generator=self.gen, log=self.log, config=self.cfg, batch_size=self.cfg.batch_size,
            train_rows=len(self.data.train),
        )

    def fit(self) -> TrainResult:
        """Run all stages, then evaluate on the test split."""
        reports, history = [], []
        train_samples, train_seconds = 0, 0.0
        self.train_state_bytes = self.model.table.train_state_bytes(self.cfg.sparse_optimizer)
        for stage in self.model.table.stages():
            rep, hist, samples, seconds = self._run_stage(stage)
            reports.append(rep)
            history.extend(hist)
            train_samples += samples
            train_seconds += seconds
        valid_auc, _ = evaluate(self.model, self.data.valid, self.cfg.eval_batch_size)
        test_auc, test_ll = evaluate(self.model, self.data.test, self.cfg.eval_batch_size)
        return TrainResult(
            valid_auc=valid_auc, test_auc=test_auc, test_logloss=test_ll,
            train_samples_per_s=train_samples / train_seconds if train_seconds > 0 else float("nan"),
            train_seconds=train_seconds, train_state_bytes=self.train_state_bytes, stages=reports,
            history=history,
        )

    def _run_stage(self, stage: Stage) -> tuple[StageReport, list[dict], int, float]:
        cfg, model = self.cfg, self.model
        t0 = time.perf_counter()
        ctx = self._context()
        if stage.reset_head:
            model.load_state_dict(self.head_init, strict=False)
        if stage.before is not None:
            stage.before(ctx)
        self.train_state_bytes = max(self.train_state_bytes, model.table.train_state_bytes(cfg.sparse_optimizer))
        epochs = cfg.epochs if stage.epochs is None else stage.epochs
        n = len(self.data.train)
        steps_per_epoch = math.ceil(n / cfg.batch_size)
        if cfg.max_steps_per_epoch is not None:
            steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
        total_steps = epochs * steps_per_epoch
        ctx.total_steps, ctx.steps_per_epoch = total_steps, steps_per_epoch
        eval_every = max(1, steps_per_epoch // cfg.evals_per_epoch)
        history: list[dict] = []
        best_auc, best_state, bad_evals = -math.inf, None, 0
        samples, train_time = 0, 0.0
        if total_steps > 0:
            opt = _Optimizers(model, cfg, stage.groups() if stage.groups is not None else (), stage.train_head)
            batches = _infinite(self.data.train, cfg.batch_size, self.gen)
            vbatches = _infinite(self.data.valid, cfg.batch_size, self.gen) if stage.bilevel else None
            model.train()
            with _progress(cfg.progress) as prog:
                task = prog.add_task(f"{model.table.method}:{stage.name}", total=total_steps, info="")
                tick = time.perf_counter()
                for step in range(1, total_steps + 1):
                    dense, ids, y = next(batches)
                    opt.zero_grad()
                    loss = self._backward(dense, ids, y)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(
                            f"{model.table.method}: loss became {loss.item()} in stage {stage.name!r} at step {step}"
                        )
                    opt.step()
                    if vbatches is not None and opt.arch:
                        vd, vi, vy = next(vbatches)
                        opt.zero_grad()
                        self._backward(vd, vi, vy)
                        opt.arch_step()
                    samples += len(y)  # the global batch: under data parallelism, every process's rows
                    ctx.step = step
                    if stage.on_step is not None:
                        stage.on_step(ctx)
                    stopped = stage.stop is not None and bool(stage.stop(ctx))
                    if step % 50 == 0 or step == total_steps:
                        now = time.perf_counter()
                        prog.update(task, completed=step,
                                    info=f"loss {loss.item():.4f}  {samples / (train_time + now - tick):,.0f} samples/s")
                    if stopped:
                        train_time += time.perf_counter() - tick
                        best_state = None  # the stage asked to stop here: keep this state
                        self.log(f"{stage.name}: stop condition met at step {step} "
                                 f"(epoch {step / steps_per_epoch:.2f})")
                        history.append({"stage": stage.name, "step": step, "epoch": step / steps_per_epoch,
                                        "stopped": True})
                        break
                    if step % eval_every == 0 or step == total_steps:
                        train_time += time.perf_counter() - tick
                        auc, ll = evaluate(model, self.data.valid, cfg.eval_batch_size)
                        history.append({"stage": stage.name, "step": step, "epoch": step / steps_per_epoch,
                                        "valid_auc": auc, "valid_logloss": ll})
                        self.log(f"{stage.name} epoch {step / steps_per_epoch:.2f}: valid AUC {auc:.4f}")
                        if self.on_eval is not None:
                            self.on_eval(history[-1])
                        if stage.early_stopping and auc > best_auc:
                            best_auc, bad_evals = auc, 0
                            # at the stage's last step the model is the best state: no copy (a copy
                            # of a Criteo-size table is 2 GB of training memory)
                            best_state = None if step == total_steps else copy.deepcopy(model.state_dict())
                        elif stage.early_stopping:
                            bad_evals += 1
                            if bad_evals >= cfg.patience:
                                break
                        tick = time.perf_counter()
            if best_state is not None:
                model.load_state_dict(best_state)
        if stage.after is not None:
            stage.after(ctx)
        self.train_state_bytes = max(self.train_state_bytes, model.table.train_state_bytes(cfg.sparse_optimizer))
        seconds = time.perf_counter() - t0
        rep = StageReport(stage.name, seconds, samples / n if n else 0.0, samples,
                          None if best_auc == -math.inf else best_auc)
        return rep, history, samples, train_time


class _NoProgress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def add_task(self, *a, **k):
        return 0

    def update(self, *a, **k):
        pass


def _progress(enabled: bool):
    if not enabled:
        return _NoProgress()
    return Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), transient=True)


def train(model: CTRModel, data: CTRDataset, config: TrainConfig | None = None) -> TrainResult:
    """Train ``model`` on ``data`` through all of its table's stages; see :class:`Trainer`."""
    return Trainer(model, data, config).fit()


CHECKPOINT_MAGIC = b"EMBPRESS-CHECKPOINT 2 sha256="
"""A checkpoint file: this magic, the sha256 (64 hex digits) of the payload, a newline, then the
payload (``torch.save`` of ``{"state_dict", "meta"}``, meta as JSON text)."""


class CheckpointError(ValueError):
    """A checkpoint file is not an embpress checkpoint, or is truncated or damaged (names the file)."""


def save_checkpoint(path: str | Path, model: nn.Module, **meta: Any) -> None:
    """Write the model's state and ``meta`` atomically (temporary file, then rename), with a sha256
    of every byte after the header, so that :func:`load_checkpoint` detects any damage.

    Raises:
        ValueError: ``meta`` is not JSON-serialisable (say which key), before anything is written.
    """
    try:
        meta_json = json.dumps(meta, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        bad = next((k for k, v in meta.items() if not _json_ok(v)), None)
        raise ValueError(f"checkpoint meta must be JSON-serialisable (str, int, finite float, bool, None, lists "
                         f"and dicts of them): key {bad!r} is not ({e}); convert it first, e.g. "
                         f"float(x) or x.tolist()") from None
    buf = io.BytesIO()
    torch.save({"state_dict": model.state_dict(), "meta": meta_json}, buf)
    payload = buf.getvalue()
    path = Path(path)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a save that was killed
        stale.unlink(missing_ok=True)
    with atomic_open(path, "wb") as fh:
        fh.write(CHECKPOINT_MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n")
        fh.write(payload)


def _json_ok(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True


def load_checkpoint(path: str | Path, model: nn.Module) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` into ``model``; returns its meta.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: not an embpress checkpoint, truncated, or any byte changed (checksum).
        RuntimeError: the state does not fit ``model`` (torch names the keys).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist" + (" (it is a folder)" if path.is_dir() else ""))
    data = path.read_bytes()
    header_len = len(CHECKPOINT_MAGIC) + 64 + 1
    if not data.startswith(CHECKPOINT_MAGIC) or len(data) < header_len or data[header_len - 1:header_len] != b"\n":
        raise CheckpointError(f"checkpoint {path} is not an embpress checkpoint (format 2; header "
                              f"{CHECKPOINT_MAGIC.decode()}...): damaged, or written by something else")
    expected = data[len(CHECKPOINT_MAGIC):header_len - 1]
    payload = memoryview(data)[header_len:]
    if hashlib.sha256(payload).hexdigest().encode() != expected:
        raise CheckpointError(f"checkpoint {path} is damaged: the sha256 of its {len(payload):,} payload bytes "
                              "does not match its header (truncated or changed on disk); restore it or train again")
    try:
        blob = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
        meta = json.loads(blob["meta"])
        state = blob["state_dict"]
    except Exception as e:  # checksum matched: the writer itself was not save_checkpoint
        raise CheckpointError(f"checkpoint {path} has an intact checksum but an unreadable payload: {e}") from None
    model.load_state_dict(state)
    return meta
