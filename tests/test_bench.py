"""bench/gpu_check.sh runs end to end on a CPU (``--device cpu --quick``), so that the first GPU
run is a measurement, not a round of debugging (issue 12). The numbers are not checked (a shared
2-core machine); the table's shape, its JSON line and the options it resolved are."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROWS = ("matmul", "forward_fp32_eager", "forward_fast", "engine_reduced_walk", "pool_1_actor_uint8")


@pytest.mark.slow
@pytest.mark.ray
def test_gpu_check_runs_end_to_end_on_cpu_quick():
    """Every row measured (a positive rate, no error text), the ratios present, the fast path's
    options on the CPU (no compile in --quick, no channels_last on a CPU), and the JSON line last.
    The pool row starts a Ray cluster of its own (``address="local"``), never the session's."""
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_TIMEOUT_S": "900"}
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--device", "cpu", "--quick"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1000)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    res = json.loads(lines[-1])
    assert res["device"] == "cpu" and res["quick"] is True and res["flops_per_image"] > 0
    for name in ROWS:
        assert res[name]["rate"] > 0, (name, res[name])
    for name, base in (("forward_fast", "forward_fp32_eager"), ("engine_reduced_walk", "forward_fast"),
                       ("pool_1_actor_uint8", "engine_reduced_walk")):
        assert res[name]["ratio"] == pytest.approx(res[name]["rate"] / res[base]["rate"])
    fast = res["fast_options"]
    assert not fast["compile"] and not fast["cuda_graphs"] and not fast["channels_last"]
    assert 16 <= fast["micro_batch"] <= 32                      # measured within the --quick cap
    table = "\n".join(lines[:-1])
    assert "error" not in table and all(name in table for name in ROWS)
