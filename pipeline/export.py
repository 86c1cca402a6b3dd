"""Stage `export`: data/models/model.pt -> data/models/model.onnx + metadata.json (parity-checked)."""

from uml.export import export
from uml.stage import run_stage

if __name__ == "__main__":
    raise SystemExit(run_stage("export", __doc__, export))
