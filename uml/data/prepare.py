"""The ``prepare`` stage as a library function: raw data (or the generator) -> ``dataset.zarr``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from uml.config import DataParams, Params, Paths
from uml.data.importers import folder_source, refuge_source
from uml.data.records import FUNDUS_CLASS_NAMES, FUNDUS_MASK_CLASSES, FUNDUS_POSITIVE_CLASS, RecordSource
from uml.data.store import SPLIT_NAMES, write_dataset
from uml.data.synthetic import SyntheticSource
from uml.errors import ConfigError

log = logging.getLogger(__name__)


def open_source(data: DataParams) -> RecordSource:
    """The record source selected by ``data.source`` (files are listed and paired here)."""
    if data.source != "folder" and data.positive_class not in (None, FUNDUS_CLASS_NAMES[FUNDUS_POSITIVE_CLASS]):
        raise ConfigError(f"data.positive_class: the {data.source} source's positive class is "
                          f"{FUNDUS_CLASS_NAMES[FUNDUS_POSITIVE_CLASS]!r}, got {data.positive_class!r}")
    if data.source == "synthetic":
        if list(data.mask_classes) != list(FUNDUS_MASK_CLASSES):
            raise ConfigError(f"data.mask_classes: the synthetic source has mask classes "
                              f"{list(FUNDUS_MASK_CLASSES)}, got {data.mask_classes}")
        return SyntheticSource(data.synthetic, data.image_size, seed=data.seed)
    if data.source == "refuge":
        return refuge_source(data)
    return folder_source(data)


def _source_info(data: DataParams) -> dict[str, Any]:
    if data.source == "synthetic":
        return {"synthetic": data.synthetic.model_dump(mode="json")}
    return {"path": str(Path(data.path or "").expanduser().resolve())}


def prepare(params: Params) -> Path:
    """Build ``<data.root>/prepared/dataset.zarr`` from ``data.source``; returns its path."""
    data = params.data
    out = Paths(params).dataset
    source = open_source(data)
    attrs = write_dataset(
        source,
        out,
        class_names=source.class_names,
        mask_classes=source.mask_classes,
        positive_class=source.positive_class,
        source=data.source,
        image_size=data.image_size,
        split=data.split,
        seed=data.seed,
        source_info=_source_info(data),
    )
    _log_summary(out, attrs)
    return out


def _log_summary(out: Path, attrs: dict[str, Any]) -> None:
    from uml.data.store import open_prepared

    prepared = open_prepared(out)
    labels = np.asarray(prepared.labels[:])
    names, positive = attrs["class_names"], attrs["positive_class"]
    log.info("wrote %s: %d images of %dx%d from %s, content hash %s", out, attrs["num_images"],
             attrs["image_size"], attrs["image_size"], attrs["source"], attrs["content_hash"][:12])
    for split in SPLIT_NAMES:
        idx = prepared.split(split)
        counts = np.bincount(labels[idx], minlength=len(names))
        per_class = ", ".join(f"{name} {int(c)}" for name, c in zip(names, counts, strict=True))
        log.info("  %-5s %4d images (%s; positive class %s %.1f %%)", split, idx.shape[0], per_class, names[positive],
                 100.0 * counts[positive] / max(1, idx.shape[0]))
    fp = attrs["fingerprint"]
    log.info("  channel mean %s, std %s", _fmt(fp["channel_mean"]), _fmt(fp["channel_std"]))
    log.info("  mask class frequencies %s",
             ", ".join(f"{k} {100 * v:.2f} %" for k, v in fp["mask_class_frequencies"].items()))


def _fmt(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.3f}" for v in values) + "]"
