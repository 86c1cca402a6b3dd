"""The ``prepare`` stage as a library function: raw data (or the generator) -> ``dataset.zarr``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from uml.config import DataParams, Params, Paths
from uml.data.importers import folder_source, refuge_source
from uml.data.records import FUNDUS_CLASS_NAMES, FUNDUS_MASK_CLASSES, FUNDUS_POSITIVE_CLASS, GivenSplit, RecordSource
from uml.data.store import SPLIT_NAMES, given_split_sizes, write_dataset
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
    return {"path": str(Path(data.path).expanduser().resolve())}


def choose_split(source: RecordSource, data: DataParams) -> GivenSplit | None:
    """The split the data set defines itself, when ``data.split.method`` takes it (``given``, or
    ``auto`` and the data set defines one); None for a random split. ``given`` with a data set
    that defines no split is a :class:`ConfigError` saying why; the sizes of a given split are
    checked here, before any image is decoded."""
    method = data.split.method
    given: GivenSplit | None = getattr(source, "given_split", None)
    note: str = getattr(source, "split_note", f"the {source.name} source defines no split")
    if method == "random":
        return None
    if given is None:
        if method == "given":
            raise ConfigError(f"data.split.method: 'given', but the {source.name} data set defines no split: {note}. "
                              "REFUGE defines one when its Training, Validation and Test folders are all under "
                              "data.path; a folder source when labels.csv has a split column. Or use random")
        log.info("split: random (data.split.method is auto and %s)", note)
        return None
    given_split_sizes(given, data.split, source=note)
    log.info("split: given, %s", given.description)
    return given


def dvc_tracking_note(path: Path, start: Path | None = None) -> str | None:
    """Why DVC does not version the raw data at ``path``, or None when it does.

    ``dvc.yaml`` makes ``data.path`` a dependency of ``prepare`` (``${data.path}``), so ``dvc
    status`` sees changes to it wherever it lies. DVC versions it (a clone or an earlier commit
    can bring it back) only when a ``.dvc`` file tracks it, a folder above it inside the
    repository or data below it (``dvc add``, ``dvc import``). The repository is the nearest folder above
    ``start`` (default: the working directory, where DVC runs the stage) that holds ``.dvc/``;
    outside any DVC repository there is nothing to say (None)."""
    here = (start or Path.cwd()).resolve()
    repo = next((d for d in (here, *here.parents) if (d / ".dvc").is_dir()), None)
    if repo is None:
        return None
    path = path.expanduser().resolve()
    if not path.is_relative_to(repo):
        return (f"data.path {path} lies outside the DVC repository {repo}: `dvc repro` re-runs prepare when its files "
                "change (an external dependency), but DVC does not version them, so no clone or earlier commit can "
                "bring them back. To version the data, bring it into the repository with `dvc add` (e.g. copy it to "
                "data/raw/<name> and run `dvc add data/raw/<name>`) or `dvc import <repository> <path> -o "
                "data/raw/<name>`, and set data.path to data/raw/<name>")
    for folder in (path, *path.parents):
        if folder == repo:
            break
        if folder.with_name(folder.name + ".dvc").is_file():
            return None
    if path.is_dir() and next(path.rglob("*.dvc"), None) is not None:
        return None  # e.g. data.path data/raw holding data/raw/<name> and its data/raw/<name>.dvc
    rel = path.relative_to(repo).as_posix()
    return (f"data.path {rel} is not versioned by DVC (no .dvc file tracks it): `dvc repro` re-runs prepare when its "
            f"files change, but no clone or earlier commit can bring them back. Run `dvc add {rel}` (or bring the data "
            f"in with `dvc import`) and commit the .dvc file")


def prepare(params: Params) -> Path:
    """Build ``<data.root>/prepared/dataset.zarr`` from ``data.source``; returns its path."""
    data = params.data
    out = Paths(params).dataset
    source = open_source(data)
    if data.source != "synthetic":
        note = dvc_tracking_note(Path(data.path))
        if note:
            log.warning("%s", note)
    given = choose_split(source, data)
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
        given=given,
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
    log.info("  split (%s): %s", attrs["split_method"], attrs["split_description"])
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
