"""Data-parallel training: two CPU processes under torchrun (gloo) end with identical parameters."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

SCRIPT = textwrap.dedent(
    """
    import os
    import sys

    import torch

    from poslab.lab.presets import get_preset
    from poslab.lab.train import train

    out = sys.argv[1]
    config = get_preset("smoke").override(
        ["train.steps=8", "train.eval_every=4", "train.checkpoint_every=4", "model.dropout=0.1"]
    )
    result = train(config, os.path.join(out, "run"), progress=False)
    rank = os.environ["RANK"]
    torch.save(result.model.state_dict(), os.path.join(out, f"params_rank{rank}.pt"))
    """
)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without distributed")
def test_two_processes_end_with_identical_parameters(tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
    ]
    proc = subprocess.run(
        [*command, str(script), str(tmp_path)], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    params = [torch.load(tmp_path / f"params_rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert params[0].keys() == params[1].keys()
    for name, value in params[0].items():
        assert torch.equal(value, params[1][name]), name

    run_dir = tmp_path / "run"
    results = json.loads((run_dir / "results.json").read_text())  # written once, by process 0
    assert results["step"] == 8 and set(results["metrics"]["splits"]) == {
        "id",
        "ood_sparse",
        "ood_dense",
    }
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    evals = [json.loads(line)["step"] for line in lines if json.loads(line)["kind"] == "eval"]
    assert evals == [4, 8]  # process 0 alone writes: no duplicated records
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    for name, value in params[0].items():
        assert torch.equal(checkpoint["model"][name], value), name
