"""Stage ``evaluate``: the exported ONNX model on the test split -> data/reports/metrics.json + plots."""

from uml.evaluate import evaluate
from uml.stage import run_stage

if __name__ == "__main__":
    raise SystemExit(run_stage("evaluate", "Evaluate data/models/model.onnx on the test split (onnxruntime).", evaluate))
