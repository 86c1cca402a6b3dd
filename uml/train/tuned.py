"""The tuned values of the ``tune`` stage applied to a training run's params.

``best_params.yaml`` holds params sections (``loss: {cls_weight: ...}``) plus a record of what they
were tuned for; :func:`effective_params` applies them only when that record matches the run's
own model, data, search space and tune-stage code, and says why not otherwise.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml

from uml.config import Params, Paths
from uml.errors import ConfigError
from uml.provenance import flatten, tuning_mismatch, tuning_target

log = logging.getLogger(__name__)

# Top-level keys of best_params.yaml that describe the values rather than being params sections.
TUNED_META_KEYS = ("tuned_for", "selection")


def load_tuned(path: Path) -> tuple[dict[str, Any], Any]:
    """The flat overrides of a ``best_params.yaml`` (same keys as ``params.yaml``) and its
    ``tuned_for`` record (None when the file has none)."""
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read tuned params: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of params sections (e.g. loss: {{cls_weight: ...}})")
    values = {key: value for key, value in raw.items() if key not in TUNED_META_KEYS}
    if not values:
        raise ConfigError(f"{path}: holds no tuned values (expected params sections such as loss: {{cls_weight: ...}})")
    return flatten(values), raw.get("tuned_for")


def effective_params(params: Params, data_hash: str) -> tuple[Params, dict[str, Any]]:
    """Params with the tuned values applied when ``train.use_tuned``, the sweep has run, and its
    ``best_params.yaml`` was tuned for this model, data (``data_hash``), search space and code.
    Otherwise a warning says why, and the params are used as written.

    Returns the params and the overrides that were applied (empty when none)."""
    paths = Paths(params)
    if not params.train.use_tuned:
        return params, {}
    if not paths.best_params.is_file():
        log.warning("train.use_tuned is true but %s does not exist (run the tune stage first); "
                    "using the params as written", paths.best_params)
        return params, {}
    overrides, tuned_for = load_tuned(paths.best_params)
    mismatch = tuning_mismatch(tuned_for, tuning_target(params, data_hash))
    if mismatch:
        log.warning("not using the tuned values of %s: %s. Using the params as written; run the tune stage for "
                    "this configuration, or set train.use_tuned: false to silence this", paths.best_params, mismatch)
        return params, {}
    tuned = params.with_overrides(overrides, source=str(paths.best_params))
    log.info("using tuned values from %s: %s", paths.best_params, ", ".join(f"{k}={v}" for k, v in overrides.items()))
    return tuned, overrides
