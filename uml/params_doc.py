"""Writes the params reference page (``docs/reference/params.md``) from the params schema.

Every key, its type and allowed range, and its default come from the pydantic schema in
:mod:`uml.config`; the description of a key is the comment written above it in the schema, or
else the comment beside it in ``params.yaml``; the last column is the value
``configs/paper-gpu.yaml`` sets, where it sets one. Regenerate the page after changing the schema::

    python -m uml.params_doc docs/reference/params.md

``tests/docs/test_params_reference.py`` fails when the committed page differs from what this
module generates. Nothing here is imported by a pipeline stage.
"""

from __future__ import annotations

import inspect
import json
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any

import annotated_types
import yaml
from pydantic import BaseModel

from uml.config import Params

REPO = Path(__file__).resolve().parents[1]
PARAMS_FILE = REPO / "params.yaml"
RECIPE_FILE = REPO / "configs" / "paper-gpu.yaml"
COMMAND = "python -m uml.params_doc docs/reference/params.md"

# Descriptions of the keys that have no comment in the schema or in params.yaml (a test checks
# that each names a key of the schema).
NOTES: dict[str, str] = {
    "data.seed": "Seeds the synthetic images (each from `(seed, index)`) and the stratified split.",
    "data.split.val": "Share of all images in the validation split of a random split (stratified by label).",
    "data.split.test": "Share of all images in the test split of a random split (stratified by label); the rest trains.",
    "data.mask_classes": "Mask class names in pixel-value order; the first is the background.",
    "data.synthetic.num_images": "Images the synthetic source renders.",
    "data.synthetic.vcdr_softness": "Width of the logistic boundary around `vcdr_threshold`.",
    "data.augment.enabled": "Joint image and mask augmentation while training (never for validation or test).",
    "data.augment.hflip": "Probability of a horizontal flip.",
    "data.augment.affine.p": "Probability of the affine transform (image linear, mask nearest, black outside).",
    "data.augment.affine.scale": "Zoom drawn from [1 - scale, 1 + scale].",
    "data.augment.affine.translate": "Shift drawn from ±translate of the image size.",
    "data.augment.affine.rotate": "Rotation drawn from ±rotate degrees.",
    "data.augment.color.p": "Probability of the colour jitter (image only).",
    "data.augment.color.brightness": "Colour jitter strength (albumentations `ColorJitter`).",
    "data.augment.color.contrast": "Colour jitter strength.",
    "data.augment.color.saturation": "Colour jitter strength.",
    "data.augment.color.hue": "Colour jitter strength.",
    "model.seg_weights": "Local weight file of the segmentation encoder (see `model.cls_weights`).",
    "model.seg_encoder": "timm model name of the segmentation encoder.",
    "model.feature_strides": "The four encoder strides that feed the decoders, fine to coarse.",
    "model.mixer_width": "Channels each encoder feature is projected to in the feature mixer.",
    "model.mixer_widths": "Channels of the mixer outputs f_m, fine to coarse.",
    "model.decoder_widths": "Channels of the navigator's decoder, fine to coarse.",
    "model.mutual_head_width": "Channels of the mutual decoder's head.",
    "model.instructor_widths": "Channels of the instructor's four separable convolutions.",
    "model.instructor_dilation": "Dilation of the instructor's convolutions.",
    "model.dropout": "Dropout rate of the decoder units.",
    "loss.cls_weight": "Weight of L_cls, the image-level evidential loss.",
    "loss.seg_weight": "Weight of L_seg, the navigator's Dice loss.",
    "loss.mut_weight": "Weight of L_mut, the mutual branch's evidential loss.",
    "train.weight_decay": "Adam's weight decay.",
    "train.poly_power": "Exponent of the poly decay.",
    "train.min_lr": "Floor of the learning rate.",
    "train.seed": "Seeds the model's initialisation, shuffling, dropout and augmentation.",
    "ray.num_workers": "Training workers (DDP ranks); they must divide `train.batch_size`.",
    "ray.use_gpu": "One GPU per worker, NCCL; false: CPU, gloo.",
    "ray.max_failures": "Restarts of the worker group from its last checkpoint after a failure (-1: no limit).",
    "tune.grace_period": "Epochs a trial runs before ASHA may stop it.",
    "tune.reduction_factor": "ASHA's reduction factor.",
    "tune.workers_per_trial": "Training workers of each trial (they must divide `train.batch_size`).",
    "tune.seed": "Seeds the search's draws.",
    "export.opset": "ONNX opset of the exported graph.",
    "export.parity_images": "Validation images run through torch and onnxruntime for the parity check.",
    "evaluate.batch_size": "Images per onnxruntime batch, and per read from the store of a test split too large to hold in memory (each pass streams it).",
    "evaluate.salt_pepper_amounts": "Shares of pixels set to 0 or 1 by salt-and-pepper noise.",
    "evaluate.referral_fractions": "Shares of the most uncertain images referred, for `unc/referral_acc_<pct>`.",
    "evaluate.calibration_bins": "Bins of the reliability diagram and of `cls/ece`.",
    "evaluate.num_panels": "Example panels (image, truth, prediction, uncertainty) written to the plots.",
}

_FIELD_LINE = re.compile(r"^    (\w+)\s*:")
_COMMENT_LINE = re.compile(r"^    #\s?(.*)$")
_YAML_KEY = re.compile(r"^(\s*)([\w.]+):(.*)$")


def schema_comments(model: type[BaseModel]) -> dict[str, str]:
    """Field name -> the comment block written directly above the field in the class body."""
    comments: dict[str, str] = {}
    block: list[str] = []
    for line in inspect.getsource(model).splitlines():
        comment = _COMMENT_LINE.match(line)
        if comment:
            block.append(comment.group(1).strip())
            continue
        field = _FIELD_LINE.match(line)
        if field and field.group(1) in model.model_fields and block:
            comments[field.group(1)] = " ".join(block)
        block = []
    return comments


def params_yaml_comments(text: str) -> dict[str, str]:
    """Dotted key -> the ``# comment`` beside it in a params file written in two-space indentation."""
    stack: list[str] = []
    comments: dict[str, str] = {}
    for line in text.splitlines():
        match = _YAML_KEY.match(line)
        if not match or line.lstrip().startswith("#"):
            continue
        depth = len(match.group(1)) // 2
        stack = stack[:depth] + [match.group(2)]
        rest = match.group(3)
        if " # " in f" {rest}":
            comments[".".join(stack)] = rest.split("#", 1)[1].strip()
    return comments


def _flow(value: Any) -> str:
    """A value as compact YAML flow text (``null``, ``true``, ``[a, b]``, ``{CPU: 1}``)."""
    if isinstance(value, BaseModel):
        value = value.model_dump()
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value) if abs(value) >= 1e-3 or value == 0 else f"{value:.0e}".replace("e-0", "e-")
    if isinstance(value, (int, str)):
        return str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_flow(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_flow(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " or ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        names = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in args else "")
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if origin is dict:
        value = args[1]
        if typing.get_origin(value) is typing.Annotated:  # tune.search_space's distributions
            return f"mapping {_type_name(args[0])} → distribution"
        return f"mapping {_type_name(args[0])} → {_type_name(value)}"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "mapping"
    return getattr(annotation, "__name__", str(annotation))


_BOUNDS = ((annotated_types.Ge, "≥", "ge"), (annotated_types.Gt, ">", "gt"),
           (annotated_types.Le, "≤", "le"), (annotated_types.Lt, "<", "lt"))


def _range(metadata: list[Any]) -> str:
    parts = []
    for item in metadata:
        for kind, sign, attr in _BOUNDS:
            if isinstance(item, kind):
                parts.append(f"{sign} {_flow(getattr(item, attr))}")
        if isinstance(item, annotated_types.MinLen):
            parts.append(f"at least {item.min_length} entries")
    return ", ".join(parts)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _section_rows(model: type[BaseModel], prefix: str, defaults: dict[str, Any], recipe: dict[str, Any],
                  yaml_comments: dict[str, str]) -> list[str]:
    rows = []
    comments = schema_comments(model)
    for name, field in model.model_fields.items():
        key = f"{prefix}.{name}"
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows += _section_rows(annotation, key, defaults.get(name, {}), recipe.get(name) or {}, yaml_comments)
            continue
        description = field.description or comments.get(name) or yaml_comments.get(key) or NOTES.get(key, "")
        allowed = _range(field.metadata)
        kind = _type_name(annotation) + (f" ({allowed})" if allowed else "")
        published = f"`{_flow(recipe[name])}`" if isinstance(recipe, dict) and name in recipe else ""
        rows.append(f"| `{key}` | {_cell(kind)} | `{_cell(_flow(defaults.get(name)))}` | {_cell(published)} "
                    f"| {_cell(description)} |")
    return rows


HEADER = """# Params reference

<!-- GENERATED by `{command}` from the schema in uml/config.py: do not edit by hand. -->

Every key that `params.yaml` (or a file given with `--params`) may set. A key a file leaves out
takes the default below; an unknown key, a wrong type or a value out of range stops the stage
with an error naming the key. Types are strict: `true` is not a number, `"5"` is not an int, and
YAML reads `1e-4` (no dot) as text, so write `1.0e-4`. An int is accepted where a float is
expected.

- **default**: the schema's value, which `params.yaml` writes out in full (the CPU default run).
- **paper-gpu.yaml**: the value `configs/paper-gpu.yaml` sets, where it sets one (see
  [The published GPU recipe](../how-to/gpu-recipe.md) for which of the authors' code each comes from).
- **description**: the comment above the key in the schema, or beside it in `params.yaml`, or
  else a note kept with the generator.

Regenerate this page after changing the schema: `{command}`.
"""

SECTION_INTRO = {
    "data": "Where the data comes from, how it is split and augmented. See [Train on your own data](../how-to/own-data.md).",
    "model": "The network. `null` keeps the preset's value. See [The method](../explanation/method.md).",
    "loss": "The weights of the three loss terms and the KL annealing.",
    "train": "The training run (Ray Train). `train.batch_size` is the global batch, split over `ray.num_workers`.",
    "ray": "The Ray instance or cluster. See [Train on a Ray cluster](../how-to/ray-cluster.md).",
    "tune": "The sweep (Ray Tune). See [Run experiments](../how-to/experiments.md).",
    "export": "The ONNX export. See [ONNX model and metadata.json](onnx.md).",
    "evaluate": "The test-split evaluation. See [metrics.json keys](metrics.md).",
}


def render(params_yaml: str | None = None) -> str:
    """The params reference page, as Markdown. ``params_yaml``: the text of the params file whose
    comments describe keys the schema does not (default: ``params.yaml`` as it is on disk; the
    tests pass the committed one, since a user may have rewritten the working copy)."""
    defaults = Params().model_dump()
    recipe = yaml.safe_load(RECIPE_FILE.read_text()) or {}
    yaml_comments = params_yaml_comments(PARAMS_FILE.read_text() if params_yaml is None else params_yaml)
    lines = [HEADER.format(command=COMMAND)]
    for section, field in Params.model_fields.items():
        lines.append(f"## {section}\n")
        if section in SECTION_INTRO:
            lines.append(SECTION_INTRO[section] + "\n")
        lines.append("| key | type | default | paper-gpu.yaml | description |")
        lines.append("|---|---|---|---|---|")
        lines += _section_rows(field.annotation, section, defaults[section], recipe.get(section) or {}, yaml_comments)
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(f"usage: {COMMAND}", file=sys.stderr)
        return 2
    Path(args[0]).write_text(render())
    print(f"wrote {args[0]}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
