"""Stage `tune`: Ray Tune sweep of the loss weights -> data/tune/{best_params.yaml,results.csv,scores.png}."""

from uml.stage import run_stage
from uml.train.sweep import sweep

if __name__ == "__main__":
    raise SystemExit(run_stage("tune", __doc__, sweep))
