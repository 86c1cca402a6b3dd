"""Stage ``prepare``: raw images, masks and labels (or the embedded synthetic set) -> ``data/prepared/dataset.zarr``."""

from uml.data.prepare import prepare
from uml.stage import run_stage

if __name__ == "__main__":
    raise SystemExit(run_stage("prepare", "Build the prepared zarr data set from data.source.", prepare))
