"""A workspace in which the documentation's Python snippets run: the files a finished `dvc repro`
leaves that the snippets read, made small and fast. The ONNX model is the toy of
tests/toy_onnx.py (it follows the export contract), `model.pt` an untrained `small` model at
64 px, and `metrics.json` the evaluation of the toy on its fundus set."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.docs.markdown import REPO
from tests.toy_onnx import draw_fundus, export_toy, fundus_set

SIZE = 64


@pytest.fixture(scope="session")
def toy_evaluation(tmp_path_factory) -> tuple[Path, dict[str, float]]:
    """A folder with `data/models/model.onnx` + `metadata.json`, and the metrics the evaluate
    stage computes for that model (bootstrap intervals included)."""
    from uml.config import EvaluateParams
    from uml.evaluate import evaluate_arrays
    from uml.onnx_model import OnnxModel

    folder = tmp_path_factory.mktemp("docs-workspace")
    model = OnnxModel(export_toy(folder / "data" / "models", image_size=SIZE))
    metrics = evaluate_arrays(model, *fundus_set(SIZE), EvaluateParams(bootstrap_samples=100))
    return folder, metrics


@pytest.fixture(scope="session")
def docs_workspace(toy_evaluation) -> Path:
    import torch

    from uml.evaluate import write_metrics
    from uml.models import build_model, save_model

    folder, metrics = toy_evaluation
    write_metrics(folder / "data" / "reports" / "metrics.json", metrics)
    torch.manual_seed(0)
    save_model(build_model("small", image_size=SIZE), folder / "data" / "models" / "model.pt",
               extra={"class_names": ["non-glaucoma", "glaucoma"], "mask_classes": ["background", "disc", "cup"]})
    for name, ratio, size in (("photo1.jpg", 0.7, 300), ("photo2.png", 0.3, 200)):
        image, _ = draw_fundus(size, size * 0.3, ratio)
        Image.fromarray(np.ascontiguousarray(image)).save(folder / name)
    shutil.copy(REPO / "params.yaml", folder / "params.yaml")
    shutil.copytree(REPO / "configs", folder / "configs")
    return folder
