"""The GPU check (bench/gpu_check.py) runs here in its CPU rehearsal, so it cannot rot before a GPU shows up."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_the_dry_run_prints_every_row_and_passes() -> None:
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--dry"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {line.split("|")[1].strip(): line.split("|")[2:5] for line in proc.stdout.splitlines()[2:]}
    for check in ("semantic scores", "retrieval decoder embeddings"):
        measured, bound, result = rows[f"parity cpu fp32: {check}"]
        assert float(re.sub("rel err ", "", measured)) <= 1e-4 and result.strip() == "ok"
    assert rows["parity cpu fp32: caption ids"][0].strip() == "equal"
    assert rows["autocast bfloat16 vs fp32: label map"][2].strip() == "ok"
    assert any(k.startswith("speed parity batch 2") and "images/s" in v[0] for k, v in rows.items())
    assert "faiss" in rows


def test_a_failed_row_fails_the_run(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Injected: the golden semantic scores scaled by 1.01 (a 1% error): the row says FAIL and the exit status is 1."""
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_check
    import numpy as np

    real = np.load

    def scaled(path: object) -> dict[str, np.ndarray]:
        data = dict(real(path))  # type: ignore[call-overload]
        data["seg_sem_seg"] = data["seg_sem_seg"] * 1.01
        return data

    monkeypatch.setattr(np, "load", scaled)
    monkeypatch.setattr(gpu_check, "speed_rows", lambda *a, **k: [])
    assert gpu_check.main(["--dry"]) == 1
    assert re.search(r"parity cpu fp32: semantic scores .*FAIL", capsys.readouterr().out)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run `make gpu-check` there)")
def test_cuda_outputs_match_the_golden_data_and_autocast_agrees() -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_check

    rows = gpu_check.parity_rows("cuda", ["bfloat16", "float16"])
    assert all(passed is not False for *_, passed in rows), rows
