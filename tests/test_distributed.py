"""Data-parallel training: 2 gloo processes under torchrun follow the 1-process run (same AUC, same
parameters up to the order of float additions), sparse row gradients and dense gradients alike."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from embpress.data.registry import load_dataset
from embpress.models import build_model
from embpress.tables import Ratio, build_table
from embpress.train import TrainConfig, Trainer, load_checkpoint

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available in this torch build")

SPEC = "synthetic:rows=6000,num_fields=4,num_dense=2,max_cardinality=800,seed=3"
ROOT = Path(__file__).resolve().parents[1]


def _model(data, method):
    torch.manual_seed(0)
    table = build_table(method, fields=data.fields, dim=8, budget=Ratio(4))
    return build_model("dlrm", table=table, num_dense=data.num_dense)


def test_two_gloo_processes_match_one(tmp_path):
    method = "hash"  # sparse row gradients (the table) and dense ones (the MLPs)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    ckpt = tmp_path / "two.ckpt"
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "embpress.cli",
         "train", "-d", SPEC, "--method", method, "--ratio", "4", "--dim", "8", "--epochs", "2",
         "--batch-size", "256", "--threads", "1", "--no-progress", "--checkpoint", str(ckpt)],
        capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    two = json.loads(out.stdout.strip().splitlines()[-1])
    assert two["processes"] == 2

    data = load_dataset(SPEC, progress=False)
    one_model = _model(data, method)
    before = {k: v.clone() for k, v in one_model.state_dict().items()}
    one = Trainer(one_model, data, TrainConfig(epochs=2, batch_size=256, lr=3e-3, sparse_lr=3e-3, seed=0,
                                               progress=False)).fit()
    two_model = _model(data, method)
    load_checkpoint(ckpt, two_model)
    moved = 0
    for k, v in one_model.state_dict().items():
        torch.testing.assert_close(two_model.state_dict()[k], v, atol=1e-5, rtol=1e-4, msg=k)
        moved += int(not torch.equal(v, before[k]))
    assert moved >= 3  # the table and the MLPs trained
    assert abs(two["test_auc"] - one.test_auc) < 1e-4 and one.test_auc > 0.6
