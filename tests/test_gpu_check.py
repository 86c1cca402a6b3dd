"""benchmarks/gpu_check.py: its CPU dry run of the model and loader sections writes every number
the README table needs, and without CUDA it refuses to run instead of measuring the CPU.

The train section (Ray, NCCL on a GPU) is not run here: it starts Ray clusters of its own and is
exercised on a GPU machine (and by the train stage's own tests)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
# Two of the eight variants keep the test short; together they switch on every lever.
VARIANTS = ("fp32", "bf16+channels_last+cudnn_benchmark")


def run(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    # No GPU is visible to the script, also on a machine that has one.
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)


def positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def test_dry_run_of_model_and_loader_records_every_number(tmp_path):
    out = tmp_path / "gpu_check.json"
    done = run("--dry-run", "--sections", "model", "loader", "--variants", *VARIANTS, "--workers", "0", "2",
               "--out", str(out))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    results = json.loads(out.read_text())

    assert results["meta"]["dry_run"] is True and results["meta"]["sections"] == ["model", "loader"]
    assert results["meta"]["peak_tflops"]["bf16"] == 989 and results["meta"]["peak_tflops"]["tf32"] == 494
    assert "train" not in results  # no Ray here

    model = results["model"]
    assert (model["preset"], model["size"], model["batch_size"]) == ("small", 64, 2)
    for key in ("params", "flops_per_step", "flops_per_image"):
        assert positive(model[key]), (key, model[key])
    assert model["flops_per_step"] == pytest.approx(model["flops_per_image"] * 2)
    assert list(model["variants"]) == list(VARIANTS)
    for name, row in model["variants"].items():
        for key in ("images_per_s", "vs_fp32", "peak_memory_bytes", "achieved_tflops", "peak_tflops", "mfu"):
            assert positive(row[key]), (name, key, row[key])
        assert row["rounds_images_per_s"] and all(positive(r) for r in row["rounds_images_per_s"])
        assert isinstance(row["syncs_per_step"], int) and row["syncs_per_step"] >= 0  # no device: no syncs
        # MFU is the achieved FLOP/s over the variant's own peak.
        assert row["mfu"] == pytest.approx(model["flops_per_step"] * row["images_per_s"] / 2 / (row["peak_tflops"] * 1e12))
    assert model["variants"]["fp32"]["vs_fp32"] == 1.0
    lever = model["variants"][VARIANTS[1]]
    assert (lever["precision"], lever["channels_last"], lever["cudnn_benchmark"], lever["peak_tflops"]) == ("bf16", True, True, 989)
    assert model["variants"]["fp32"]["peak_tflops"] == 494

    loader = results["loader"]
    assert set(loader["workers"]) == {"0", "2"}
    for workers, row in loader["workers"].items():
        assert positive(row["samples_per_s"]) and positive(row["vs_model"]), (workers, row)
    assert row["per_worker"] == pytest.approx(row["samples_per_s"] / 2)
    assert loader["model_variant"] in VARIANTS and positive(loader["model_images_per_s"])
    assert isinstance(loader["workers_for_model"], int) and loader["workers_for_model"] >= 1

    # The markdown tables the README takes.
    assert "| variant | training images/s | vs fp32 |" in done.stdout
    assert "| DataLoader workers | samples/s |" in done.stdout
    assert "Dry run on the CPU" in done.stdout


def test_without_cuda_it_fails_loudly_instead_of_measuring_the_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    done = run("--sections", "model", "--out", str(out), timeout=120)
    assert done.returncode != 0
    assert "CUDA is not available" in done.stderr and "--dry-run" in done.stderr
    assert not out.exists() and "| variant |" not in done.stdout  # nothing measured
