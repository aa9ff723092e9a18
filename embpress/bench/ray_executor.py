"""The CTR grid's trials as Ray tasks (``embpress bench --executor ray``), on one machine or a cluster.

Each trial is one Ray Core task asking for ``cpus_per_trial`` CPUs; Ray sets ``OMP_NUM_THREADS`` to
that number in the task's worker and the task sets torch's thread count to it too. The dataset is
put in Ray's object store once per dataset (its arrays are then read in place by every task on a
node, not rebuilt or reloaded per task). Tasks return ``(status, metrics, reason)``; the driver
alone appends records (:func:`embpress.bench.ctr.run_bench`), so resume, identity and the record
layout are those of a serial run. Ray is imported when the executor first runs, never when
embpress is imported.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence
from typing import Any

from embpress.bench.ctr import BenchConfig, Trial, _data_metrics, execute_trial
from embpress.data.schema import CTRDataset


def import_ray():
    """``ray``, or an ImportError that says how to install it."""
    try:
        import ray
    except ImportError:
        raise ImportError("--executor ray needs Ray, which is not installed: pip install 'embpress[ray]' "
                          "(or pip install 'ray[data]>=2.60')") from None
    return ray


def _in_memory(data: CTRDataset) -> CTRDataset:
    """The dataset without its cache files' locations: a task on another node has no such files, so it
    reads the arrays (shipped through the object store) instead of ``pread``-ing the cache."""
    splits = {name: dataclasses.replace(getattr(data, name), files=None) for name in ("train", "valid", "test")}
    return dataclasses.replace(data, **splits)


def _remote_trial(trial: Trial, cfg: BenchConfig, data: CTRDataset) -> tuple[str, dict[str, Any], str | None]:
    """Body of a trial's task: torch follows the task's CPUs (``cfg.threads``), no progress bars."""
    import torch

    torch.set_num_threads(cfg.threads)
    return execute_trial(trial, dataclasses.replace(cfg, progress=False), data)


class RayExecutor:
    """Runs a dataset's pending trials as Ray tasks and yields each result as it arrives.

    Args:
        address: a running cluster's address (``"auto"``: the one this machine belongs to); None
            starts a local Ray instance (``num_cpus`` CPUs, default all) unless one is already
            initialised in this process.
        cpus_per_trial: CPUs each trial's task asks for, and its torch threads; the grid's
            ``threads`` must equal it (it is part of a trial's identity).
        num_cpus: CPUs of a local instance (ignored with ``address``).
    """

    def __init__(self, *, address: str | None = None, cpus_per_trial: int = 1, num_cpus: int | None = None) -> None:
        if isinstance(cpus_per_trial, bool) or not isinstance(cpus_per_trial, int) or cpus_per_trial < 1:
            raise ValueError(f"--cpus-per-trial must be an int >= 1, got {cpus_per_trial!r}")
        if num_cpus is not None and (isinstance(num_cpus, bool) or not isinstance(num_cpus, int) or num_cpus < 1):
            raise ValueError(f"num_cpus must be an int >= 1 or None, got {num_cpus!r}")
        self.address, self.cpus_per_trial, self.num_cpus = address, cpus_per_trial, num_cpus

    def _connect(self):
        ray = import_ray()
        if not ray.is_initialized():
            if self.address is None:
                ray.init(num_cpus=self.num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=False)
            else:
                ray.init(address=self.address, log_to_driver=False)
        return ray

    def __call__(self, todo: Sequence[tuple[Trial, dict[str, Any]]], cfg: BenchConfig,
                 data: CTRDataset) -> Iterator[tuple[Trial, dict[str, Any], str, dict[str, Any], str | None]]:
        if cfg.threads != self.cpus_per_trial:
            raise ValueError(f"--threads {cfg.threads} differs from --cpus-per-trial {self.cpus_per_trial}: on Ray "
                             "a trial's torch threads are its task's CPUs; give the same number (or leave "
                             "--threads out)")
        ray = self._connect()
        cluster_cpus = ray.cluster_resources().get("CPU", 0)
        if cluster_cpus < self.cpus_per_trial:
            raise ValueError(f"--cpus-per-trial {self.cpus_per_trial} is more than the Ray cluster's "
                             f"{cluster_cpus:g} CPUs: no trial could ever be scheduled")
        task = ray.remote(num_cpus=self.cpus_per_trial, max_retries=0)(_remote_trial)
        data_ref = ray.put(_in_memory(data))  # once per dataset, shared by every task
        pending = {task.remote(t, cfg, data_ref): (t, config) for t, config in todo}
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                t, config = pending.pop(ready[0])
                try:
                    status, metrics, reason = ray.get(ready[0])
                except ray.exceptions.RayError as e:  # the worker died (killed, out of memory): a failed trial
                    status, metrics = "failed", {**_data_metrics(data), "traceback": str(e)[-2000:]}
                    reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                yield t, config, status, metrics, reason
        finally:
            for ref in pending:  # interrupted: trials not yet recorded are cancelled, and rerun on resume
                ray.cancel(ref, force=True)
            del data_ref
