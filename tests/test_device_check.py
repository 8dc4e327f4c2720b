"""benchmarks/device_check.py: the one-command GPU check, run in its CPU smoke mode so that
it cannot rot where no GPU is lent (its CUDA path is the same code with other sizes)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "device_check.py"


def test_quick_cpu_check_writes_one_table_with_every_check(tmp_path):
    out = tmp_path / "device.md"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--device", "cpu", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    text = out.read_text()
    assert text.startswith("Device check on **") and "`--device cpu`" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| check")]
    checks = [row.split(" | ")[0].removeprefix("| ") for row in rows if not row.startswith("| ---")]
    assert checks == [
        "experiment burgers2d",
        "experiment burgers2d, torchrun 1 rank",
        "AA step, history on the device",
        "resnet18 iteration, AADL / SGD",
        "fig2 preset, seed-batched",
    ]
    assert "FAILED" not in text
    assert "x Adam's step" in text and "x SGD's iteration" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where there is no GPU")
def test_cuda_without_a_gpu_is_one_line():
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cuda"], cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode != 0
    assert done.stderr.strip().count("\n") == 0 and "no CUDA device" in done.stderr
