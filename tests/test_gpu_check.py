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


def test_dry_run_of_onnx_and_collectives(tmp_path):
    """The onnx section times the CPU provider in a dry run and records whether onnxruntime has the
    CUDA provider; the collectives section runs one gloo rank over a TCP store on 127.0.0.1."""
    out = tmp_path / "gpu_check.json"
    done = run("--dry-run", "--sections", "onnx", "nccl", "--out", str(out))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["meta"]["complete"] is True and results["meta"]["problems"] == []
    assert "model" not in results and "loader" not in results

    onnx = results["onnx"]
    assert onnx["status"] == "timed" and onnx["provider"] == "CPUExecutionProvider"
    assert onnx["cuda_provider_installed"] == ("CUDAExecutionProvider" in onnx["available_providers"])
    assert positive(onnx["export_seconds"]) and positive(onnx["onnx_bytes"])
    assert [r["batch"] for r in onnx["rows"]] == [1, 2]
    for row in onnx["rows"]:
        for key in ("ort_ms", "torch_ms", "ort_images_per_s", "torch_images_per_s", "torch_over_ort"):
            assert positive(row[key]), (key, row)
        assert row["max_abs_diff"] < 1e-3  # the same graph on both sides

    nccl = results["nccl"]
    assert (nccl["backend"], nccl["world_size"], nccl["ok"]) == ("gloo", 1, True), nccl
    assert nccl["small_correct"] and nccl["big_correct"] and nccl["exit_status"] == 0
    assert positive(nccl["small_all_reduce_us"]) and positive(nccl["big_all_reduce_ms"])

    assert "| batch | onnxruntime (ms) |" in done.stdout and "**Collectives without Ray**" in done.stdout


def test_onnx_section_without_the_cuda_provider_records_why(monkeypatch):
    """On a GPU machine whose onnxruntime is the CPU-only package the section exports nothing and
    says so (not a failed check)."""
    import argparse
    import importlib.util

    import onnxruntime
    import torch

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))  # its _machine
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, gpu_check)  # its dataclasses look their module up
    spec.loader.exec_module(gpu_check)
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    args = argparse.Namespace(dry_run=False, preset="small", size=64, batch_size=2, onnx_warmup=0, onnx_iters=1)
    result = gpu_check.section_onnx(args, torch.device("cpu"))
    assert result["status"] == "not installed" and result["cuda_provider_installed"] is False
    assert "CUDAExecutionProvider" in result["reason"] and "rows" not in result
    # And what the product's own choice (uml.onnx_model) makes of the same machine.
    assert result["uml_auto_provider"]["device"] == "cpu" and "has no CUDAExecutionProvider" in result["uml_auto_provider"]["reason"]
