"""Stage `train`: Ray Train (DDP) on the prepared data set -> data/models/model.pt."""

from uml.stage import run_stage
from uml.train.trainer import train

if __name__ == "__main__":
    raise SystemExit(run_stage("train", __doc__, train))
