"""Stage `calibrate`: data/models/model.pt + the calibration split -> data/models/calibration.json (temperatures, referral threshold, unusual-image rule, vCDR interval)."""

from uml.calibrate import calibrate
from uml.stage import run_stage

if __name__ == "__main__":
    raise SystemExit(run_stage("calibrate", __doc__, calibrate))
