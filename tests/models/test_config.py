"""uml.models.config: a resolved model configuration follows the same rules as the model: section
of params.yaml, and adds the checks only a whole architecture can fail."""

from __future__ import annotations

import numpy as np
import pytest

from uml.config import parse_params
from uml.errors import ConfigError
from uml.models.config import ModelConfig, resolve_config


@pytest.mark.parametrize(("key", "value"), [
    ("dropout", 1.0), ("dropout", -0.1), ("mixer_width", 0), ("instructor_dilation", 0), ("mutual_head_width", 0),
    ("feature_strides", [2, 4, 8]), ("decoder_widths", [16, 32, 0, 128]), ("tasks", []), ("tasks", ["cls", "depth"]),
    ("navigator_head_init", "zeros"),
])
def test_params_files_and_model_configs_refuse_the_same_values(key, value):
    with pytest.raises(ConfigError, match=rf"p\.yaml: model\.{key}"):
        parse_params({"model": {key: value}}, source="p.yaml")
    with pytest.raises(ConfigError, match=rf"model config: model\.{key}"):
        resolve_config("small", **{key: value})


def test_a_model_config_needs_every_architecture_value_and_normalises_types():
    with pytest.raises(ConfigError, match="model.dropout needs a value"):
        ModelConfig(**{**resolve_config("small").to_dict(), "dropout": None})
    cfg = resolve_config("small", feature_strides=(2, 4, 8, 16), mixer_width=np.int64(32), tasks=["seg", "cls", "seg"])
    assert cfg.feature_strides == [2, 4, 8, 16] and type(cfg.mixer_width) is int and cfg.tasks == ["cls", "seg"]


def test_checks_of_the_whole_architecture_stay_with_the_config():
    with pytest.raises(ConfigError, match="doubling powers of two"):
        resolve_config("small", feature_strides=[3, 6, 12, 24])
    with pytest.raises(ConfigError, match="channel shuffle"):
        resolve_config("small", mixer_width=5)  # 2 x 5 channels: not groups of four
    with pytest.raises(ConfigError, match="divisible by the coarsest feature stride"):
        resolve_config("small", image_size=100)
