"""Training on several devices (DDP) is correct, not only runnable: two CPU processes (gloo)
train exactly what one process trains with the same global batch.

Lightning's DDP launcher re-executes the script for every process, so (as scvi-tools' own
multi-GPU tests do) training runs in a script started as a subprocess, never inside pytest:
``benchmarks/ddp_train.py``, which ``benchmarks/gpu_check.py`` also runs on GPUs. Each process
writes its per-step losses and final weights; only process 0 writes the model.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "ddp_train.py"


def run_ddp(devices: int, out: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    res = subprocess.run(
        [sys.executable, str(SCRIPT), "--devices", str(devices), "--out", str(out)],
        cwd=out,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, (
        f"{devices} devices failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    )


@pytest.mark.slow
def test_two_processes_train_what_one_process_trains_with_the_same_global_batch(tmp_path):
    import scbranch as sb

    run_ddp(1, tmp_path)
    run_ddp(2, tmp_path)
    one = np.load(tmp_path / "devices1_rank0.npz")
    r0, r1 = np.load(tmp_path / "devices2_rank0.npz"), np.load(tmp_path / "devices2_rank1.npz")
    # the same steps; each process's loss is the mean over its half of the global batch, so
    # their average is the single process's loss at the same step
    assert len(one["losses"]) == len(r0["losses"]) == len(r1["losses"]) > 5
    np.testing.assert_allclose((r0["losses"] + r1["losses"]) / 2, one["losses"], rtol=1e-5)
    # each process saw other cells (the test is not vacuous)
    assert not np.allclose(r0["losses"], r1["losses"])
    weights = [k for k in one.files if k not in ("losses", "seconds")]
    assert weights
    for k in weights:
        # gradients and the EMA stay in step across processes...
        np.testing.assert_allclose(r0[k], r1[k], rtol=0, atol=1e-7, err_msg=k)
        # ...and match one process with the same global batch (float rounding apart)
        np.testing.assert_allclose(r0[k], one[k], rtol=1e-4, atol=1e-5, err_msg=k)
    # scvi-tools' DDP history went to a shared temporary directory, not the working directory
    assert not (tmp_path / "lightning_logs").exists()
    # only process 0 wrote the model, and it loads with the trained weights
    assert sorted(p.name for p in tmp_path.glob("model*")) == ["model1", "model2"]
    state = sb.BranchedDiffusion.load(str(tmp_path / "model2")).module.state_dict()
    for k in weights:
        np.testing.assert_array_equal(state[k].numpy(), r0[k], err_msg=k)
