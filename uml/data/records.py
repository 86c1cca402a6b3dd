"""The record stream shared by every data source (synthetic generator, REFUGE and folder importers).

A source yields :class:`Record` objects that are already at the prepared size; the store writer
(:mod:`uml.data.store`) validates and writes them. Keeping this type in its own module lets the
sources and the writer depend on it without depending on each other.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

# Re-exported: the sources name their classes through this module.
from uml.fundus import FUNDUS_CLASS_NAMES, FUNDUS_MASK_CLASSES, FUNDUS_POSITIVE_CLASS  # noqa: F401


@dataclass(frozen=True)
class Record:
    """One prepared example.

    Attributes:
        id: unique identifier (file stem for imported data, ``synthetic-000042`` for generated).
        image: uint8 RGB array (H, W, 3) at the prepared size.
        mask: uint8 array (H, W) of mask class indices.
        label: image-level class index.
        origin: what error messages name: the image file path, or the generator and index.
    """

    id: str
    image: np.ndarray
    mask: np.ndarray
    label: int
    origin: str


# The prepared data set's splits, in the order the content hash takes them. calib is the
# calibration split of the post-hoc calibrate stage.
SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test", "calib")


@dataclass(frozen=True)
class GivenSplit:
    """A split that a data set defines itself (``data.split.method: given``).

    Attributes:
        assignment: record id -> the split it belongs to (``train``, ``val``, ``test``, ``calib``)
            or the name of a pool in ``pools``.
        pools: pool name -> the splits drawn from it, stratified and seeded, in the ratio of their
            ``data.split`` shares (REFUGE: its Validation set -> ``("val", "calib")``); the first
            splits are drawn in turn, the last keeps the rest.
        description: how the split was made, in words (recorded in the prepared store).
    """

    assignment: Mapping[str, str]
    description: str
    pools: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


@runtime_checkable
class RecordSource(Protocol):
    """A sized, re-iterable stream of records plus the names that give its indices meaning.

    ``positive_class`` is the index of the class that the binary metrics score (sensitivity, F1,
    AUC); the source declares it, the prepared store records it, and training, export and
    evaluation read it from there.

    A source may also define its own split: a ``given_split`` attribute holding a
    :class:`GivenSplit` (or None), and ``split_note``, a sentence saying which split the data set
    defines or why it defines none. Sources without them define no split.
    """

    name: str
    class_names: list[str]
    mask_classes: list[str]
    positive_class: int

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[Record]: ...
