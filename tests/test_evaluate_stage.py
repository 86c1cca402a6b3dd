"""The evaluate stage's outputs: metrics.json and plots/ are replaced together, only once both are
complete, and the model it evaluates must be the one its metadata describes. Run on a copy of the
miniature DAG's prepared store and exported model (tests/dag/miniature.py): the real thing."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from uml import plots
from uml.config import Paths, parse_params
from uml.errors import ModelFileError
from uml.evaluate import evaluate


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def evaluated_root(miniature_dag, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(miniature_dag.data / "prepared", root / "prepared")
    (root / "models").mkdir()
    for name in ("model.onnx", "metadata.json"):
        shutil.copy2(miniature_dag.data / "models" / name, root / "models" / name)
    params = parse_params({"data": {"root": str(root)},
                           "evaluate": {"batch_size": 12, "gaussian_sigmas": [0.1], "salt_pepper_amounts": [0.05],
                                        "num_panels": 2, "bootstrap_samples": 100}})
    evaluate(params)
    return params


def test_a_failure_keeps_the_previous_metrics_and_plots_together(evaluated_root, monkeypatch):
    paths = Paths(evaluated_root)
    metrics_before, plots_before = paths.metrics.read_bytes(), _snapshot(paths.plots)
    assert "roc.png" in plots_before and "robustness.png" in plots_before

    def fail(*args, **kwargs):  # late in the plots: the ROC, reliability and CSV files are written by then
        raise RuntimeError("plotting failed")

    monkeypatch.setattr(plots, "robustness_figure", fail)
    with pytest.raises(RuntimeError, match="plotting failed"):
        evaluate(evaluated_root)
    assert paths.metrics.read_bytes() == metrics_before
    assert _snapshot(paths.plots) == plots_before
    assert sorted(p.name for p in paths.reports.iterdir()) == ["metrics.json", "model_card.md", "plots"]  # no staging left


def test_a_rerun_replaces_both_and_drops_plots_of_the_earlier_model(evaluated_root):
    paths = Paths(evaluated_root)
    (paths.plots / "stale.png").write_bytes(b"from an earlier model")
    evaluate(evaluated_root)
    assert not (paths.plots / "stale.png").exists() and (paths.plots / "roc.png").is_file()
    assert sorted(p.name for p in paths.reports.iterdir()) == ["metrics.json", "model_card.md", "plots"]


def test_a_model_from_another_export_is_refused(evaluated_root):
    paths = Paths(evaluated_root)
    raw = bytearray(paths.model_onnx.read_bytes())
    raw[raw.index(b"pytorch")] = ord("P")  # the same graph, another file
    paths.model_onnx.write_bytes(bytes(raw))
    before = paths.metrics.read_bytes()
    with pytest.raises(ModelFileError, match=f"{paths.model_onnx}: its SHA-256 .* is not the .* that {paths.metadata}"):
        evaluate(evaluated_root)
    assert paths.metrics.read_bytes() == before


def test_a_small_test_split_is_read_once_and_gives_the_streamed_metrics(evaluated_root, monkeypatch):
    from uml import evaluate as evaluate_module
    from uml.data.store import SplitReader

    paths = Paths(evaluated_root)
    in_memory = paths.metrics.read_bytes()  # the fixture's run: the split fits IN_MEMORY_BYTES
    reads = []
    original = SplitReader.read

    def counted(self, start, stop):
        reads.append((start, stop))
        return original(self, start, stop)

    monkeypatch.setattr(SplitReader, "read", counted)
    evaluate(evaluated_root)
    assert reads == [] and paths.metrics.read_bytes() == in_memory  # read whole, up front, not per pass
    monkeypatch.setattr(evaluate_module, "IN_MEMORY_BYTES", 0)
    evaluate(evaluated_root)
    assert len(reads) > 2  # streamed: batches of every pass
    assert paths.metrics.read_bytes() == in_memory
