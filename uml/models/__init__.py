"""The UML model: ``build_model(preset, **overrides)``, ``save_model`` and ``load_model``.

``UMLNet`` (and with it timm, torchvision and torch's compiler stack: about 1.2 s of CPU) is
imported on first use. The configuration (:mod:`uml.models.config`) is all that Ray's trial and
controller processes and the sweep's driver need, and each of them starts on the same few cores
as the training workers.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from uml.errors import ModelFileError
from uml.models.config import PRESETS, ModelConfig, resolve_config

if TYPE_CHECKING:
    from uml.models.uml_net import UMLNet

__all__ = ["PRESETS", "ModelConfig", "UMLNet", "build_model", "count_parameters", "load_model", "read_model_file", "save_model"]

# 2: the architecture of the authors' 2023 code (softmax navigator, two reliable masks, ...).
MODEL_FILE_FORMAT = "uml-model/2"


def build_model(preset: str = "paper", **overrides: Any) -> UMLNet:
    """Build the UML network from a preset (``"paper"`` or ``"small"``) and overrides, e.g.
    ``build_model("small", uncertainty=False, tasks=["seg"], num_classes=2, num_mask_classes=3)``.
    """
    from uml.models.uml_net import UMLNet

    return UMLNet(resolve_config(preset, **overrides))


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save_model(model: UMLNet, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write weights + the config that rebuilds them, loadable with ``weights_only=True``.

    ``extra`` holds plain metadata (class names, hashes, scores); written atomically.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    config = model.cfg.to_dict()
    # Where the initial encoder weights came from only matters at first build; the state dict
    # supersedes it (and a reload must never download).
    config.update(pretrained=False, cls_weights=None, seg_weights=None)
    payload = {
        "format": MODEL_FILE_FORMAT,
        "config": config,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "extra": extra or {},
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def read_model_file(path: str | Path) -> dict[str, Any]:
    """The raw contents of a ``model.pt``, loaded with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: model file not found (run `python -m pipeline.train` first)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or foreign files
        raise ModelFileError(f"{path}: not a loadable uml model file ({type(exc).__name__}: {exc})") from None
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FILE_FORMAT:
        raise ModelFileError(f"{path}: not a uml model file (expected format '{MODEL_FILE_FORMAT}')")
    return payload


def load_model(path: str | Path) -> UMLNet:
    """The model of a ``model.pt``, rebuilt from its stored config, in eval mode."""
    from uml.models.uml_net import UMLNet

    payload = read_model_file(path)
    model = UMLNet(ModelConfig.from_dict(payload["config"]))
    missing, unexpected = model.load_state_dict(payload["state_dict"], strict=False)
    if missing or unexpected:
        raise ModelFileError(f"{path}: weights do not match the stored config (missing {missing[:5]}, unexpected {unexpected[:5]})")
    model.extra = payload.get("extra", {})
    return model.eval()


def __getattr__(name: str) -> Any:
    if name == "UMLNet":
        from uml.models.uml_net import UMLNet

        return UMLNet
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
