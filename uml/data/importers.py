"""Importers for real data sets: the REFUGE challenge layout and a generic folder layout.

Both produce the same :class:`~uml.data.records.Record` stream as the synthetic source. Files
are listed, paired and labelled when the source is built (so a missing mask or label stops
``prepare`` before anything is written); images are decoded and resized lazily while the store is
written. Every problem raises :class:`~uml.errors.DataError` naming the file and what is wrong.

``refuge`` (``data.source: refuge``, ``data.path``: the folder that holds the release)
    Two layouts are recognised anywhere below ``data.path``, alone or together (the full
    release has both):

    * Training400: images in class folders ``Glaucoma/`` and ``Non-Glaucoma/``, masks in
      ``Disc_Cup_Masks/Glaucoma/<id>.bmp`` and ``Disc_Cup_Masks/Non-Glaucoma/<id>.bmp`` (as in
      ``Annotation-Training400/Disc_Cup_Masks/``). The label is the class folder.
    * Flat (Validation400 / Test400 style): image files in any folder, masks in
      ``Disc_Cup_Masks/<id>.bmp``, and one label CSV. The CSV needs an id column and a label
      column; header names are matched ignoring case, spaces, ``_`` and ``-``:
      id: ``id``, ``ImgName``, ``image``, ``image_name``, ``filename``, ``file``, ``name``
      (values may carry the file extension); label: ``label``, ``glaucoma``,
      ``Glaucoma Label``, ``glaucoma_label``, ``class``. Label values: ``1``/``0`` (also ``1.0``),
      ``true``/``false``, ``yes``/``no``, ``glaucoma``/``non-glaucoma`` (also ``g``/``n``).
      When several CSV files are present, those whose name contains "label" or "glaucoma" are
      used, together (e.g. one for Validation400 and one for Test400; an id in two of them is an
      error). (REFUGE ships labels as ``.xlsx``: save each sheet as CSV.)

    The official split: when every image lies below a folder whose name says Training,
    Validation or Test (``REFUGE-Training400``, ``REFUGE-Validation400``, ``REFUGE-Test400``,
    ...) and each of the three has images, the source defines the challenge's split
    (:class:`~uml.data.records.GivenSplit`): Training is train, Test is test, and val and calib
    are drawn from Validation, stratified and seeded, in the ratio ``data.split.val :
    data.split.calib``. ``data.split.method`` decides whether it is used. An image id found in two
    parts is an error.

    Mask encoding: grey level 0 = cup, 128 = disc rim, 255 = background, mapped by thresholds so
    that resampled or re-encoded masks still work: < 10 cup, 10..245 rim, > 245 background.
    Class names are ``["non-glaucoma", "glaucoma"]``; mask classes ``["background", "disc",
    "cup"]``. Folders named ``*Illustration*`` (the REFUGE overlay pictures) are ignored.

``folder`` (``data.source: folder``)
    ``images/<id>.<png|jpg|jpeg|tif|tiff|bmp>``, ``masks/<id>.<png|bmp|tif|tiff>`` (lossless
    formats only) and ``labels.csv`` with header ``id,label`` and, optionally, a ``split`` column
    whose values are ``train``, ``val``, ``test`` or ``calib``: the data set's own split, used as
    ``data.split.method`` says (an unknown name, a missing value, an image listed in two splits or
    a split left empty is an error naming the file and line). Mask pixel values are class
    indices, or are mapped through ``data.mask_values`` ``{pixel value: class index}``; any other
    value is an error. Labels are class names or integer indices; the class names come from
    ``data.class_names`` or, when it is null, the sorted unique CSV labels (numerically when they
    are all integers). The positive class, which sensitivity, F1 and AUC score, is
    ``data.positive_class`` (a class name); when it is null, the last of ``data.class_names``, or the
    largest integer label. Text labels without either are an error: their sorted order says
    nothing about which class is positive. ``prepare`` logs which class it is.

Images are converted to RGB (grey, palette, RGBA and 16-bit inputs included) and resized to
``data.image_size`` square (area interpolation when shrinking, linear when enlarging); masks use
nearest-neighbour. Image and mask must have the same size before resizing. The files are
decoded and resized by :mod:`uml.image_io`.
"""

from __future__ import annotations

import csv
import logging
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from uml.config import DataParams
from uml.data.records import (FUNDUS_CLASS_NAMES, FUNDUS_MASK_CLASSES, FUNDUS_POSITIVE_CLASS, SPLIT_NAMES, GivenSplit,
                              Record)
from uml.errors import ConfigError, DataError
from uml.image_io import read_image, read_mask_values, resize_mask

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
# JPEG would blur class boundaries into values that belong to no class.
MASK_EXTENSIONS = (".png", ".bmp", ".tif", ".tiff")

# The optional column of a folder source's labels.csv that gives each image its split.
SPLIT_COLUMN = "split"

REFUGE_ID_COLUMNS = ("id", "imgname", "image", "imagename", "filename", "file", "name")
REFUGE_LABEL_COLUMNS = ("label", "glaucoma", "glaucomalabel", "class")
_REFUGE_POSITIVE = {"1", "1.0", "true", "yes", "glaucoma", "g"}
_REFUGE_NEGATIVE = {"0", "0.0", "false", "no", "nonglaucoma", "n"}
# REFUGE mask grey levels -> class (0 cup, 128 rim, 255 background), by thresholds.
_REFUGE_CUP_BELOW = 10
_REFUGE_BACKGROUND_ABOVE = 245

def _norm(name: str) -> str:
    """Folder/column names compared ignoring case, spaces, '_' and '-'."""
    return "".join(ch for ch in name.lower() if ch not in " _-")


def _check_same_size(image_path: Path, image_hw: tuple[int, int], mask_path: Path, mask: np.ndarray) -> None:
    if tuple(mask.shape[:2]) != image_hw:
        raise DataError(
            f"{mask_path}: mask size {mask.shape[1]}x{mask.shape[0]} does not match image "
            f"{image_path.name} size {image_hw[1]}x{image_hw[0]} (width x height)"
        )


# ---------------------------------------------------------------------------- file discovery
def _is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _files(folder: Path, extensions: Iterable[str], *, recursive: bool = False) -> list[Path]:
    exts = tuple(extensions)
    it = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in it if p.is_file() and p.suffix.lower() in exts and not _is_hidden(p, folder))


def _index_by_stem(paths: Iterable[Path], what: str) -> dict[str, Path]:
    index: dict[str, Path] = {}
    for p in paths:
        if p.stem in index:
            raise DataError(f"{p}: duplicate {what} id {p.stem!r} (also {index[p.stem]})")
        index[p.stem] = p
    return index


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DataError(f"{path}: {what} folder not found")
    return path


def _data_root(data: DataParams) -> Path:
    if not data.path:
        raise ConfigError(f"data.path: must name the raw data folder for data.source '{data.source}'")
    root = Path(data.path).expanduser().resolve()
    return _require_dir(root, f"data.path ({data.source} data)")


# ---------------------------------------------------------------------------------- sources
class _FileSource(ABC):
    """Shared part of the importers: a list of (id, image, mask, label) decoded on iteration."""

    name = "files"

    def __init__(self, items: list[tuple[str, Path, Path, int]], image_size: int,
                 class_names: list[str], mask_classes: list[str]):
        self.items = items
        self.image_size = image_size
        self.class_names = class_names
        self.mask_classes = mask_classes
        # The split the data set defines itself, if any, and a sentence on it (see RecordSource).
        self.given_split: GivenSplit | None = None
        self.split_note = "the data set defines no split"

    def __len__(self) -> int:
        return len(self.items)

    @abstractmethod
    def _read_mask(self, mask_path: Path) -> np.ndarray:
        """The mask file's stored values as a 2-D integer array."""

    @abstractmethod
    def _mask_classes(self, raw: np.ndarray, mask_path: Path) -> np.ndarray:
        """Stored values -> uint8 class indices (each importer has its own encoding)."""

    def record(self, i: int) -> Record:
        """Decode, check and resize item ``i``."""
        item_id, image_path, mask_path, label = self.items[i]
        image, original = read_image(image_path, self.image_size)
        raw = self._read_mask(mask_path)
        _check_same_size(image_path, original, mask_path, raw)
        mask = resize_mask(self._mask_classes(raw, mask_path), self.image_size)
        return Record(id=item_id, image=image, mask=mask, label=label, origin=str(image_path))

    def __iter__(self) -> Iterator[Record]:
        for i in range(len(self.items)):
            yield self.record(i)


class RefugeSource(_FileSource):
    """The REFUGE challenge layout (see the module docstring)."""

    name = "refuge"
    positive_class = FUNDUS_POSITIVE_CLASS

    def _read_mask(self, mask_path: Path) -> np.ndarray:
        return read_mask_values(mask_path, grey=True)

    def _mask_classes(self, raw: np.ndarray, mask_path: Path) -> np.ndarray:
        out = np.ones(raw.shape, np.uint8)  # 10..245: disc rim
        out[raw < _REFUGE_CUP_BELOW] = 2
        out[raw > _REFUGE_BACKGROUND_ABOVE] = 0
        return out


def _refuge_label(value: str, where: str) -> int:
    v = _norm(value)
    if v in _REFUGE_POSITIVE:
        return 1
    if v in _REFUGE_NEGATIVE:
        return 0
    if not v:
        raise DataError(f"{where}: missing glaucoma label")
    raise DataError(f"{where}: unknown glaucoma label {value!r} (expected 0/1, true/false or glaucoma/non-glaucoma)")


def _pick_column(header: list[str], accepted: tuple[str, ...], csv_path: Path, what: str) -> str:
    by_norm = {_norm(h): h for h in header}
    for name in accepted:
        if name in by_norm:
            return by_norm[name]
    raise DataError(f"{csv_path}: no {what} column; header is {header}, accepted names: {list(accepted)}")


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
            header = [h.strip() for h in (reader.fieldnames or [])]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot read label file: {exc}") from None
    if not header:
        raise DataError(f"{path}: label file is empty (expected a header row)")
    return header, rows


def _strip_image_ext(value: str) -> str:
    p = Path(value)
    return p.stem if p.suffix.lower() in IMAGE_EXTENSIONS else p.name


def _refuge_labels_csv(csv_path: Path) -> dict[str, int]:
    header, rows = _read_csv(csv_path)
    id_col = _pick_column(header, REFUGE_ID_COLUMNS, csv_path, "image id")
    label_col = _pick_column(header, REFUGE_LABEL_COLUMNS, csv_path, "glaucoma label")
    labels: dict[str, int] = {}
    for line, row in enumerate(rows, start=2):
        item_id = _strip_image_ext(row.get(id_col, ""))
        if not item_id:
            continue  # blank lines / trailing rows of spreadsheet exports
        if item_id in labels:
            raise DataError(f"{csv_path}:{line}: duplicate id {item_id!r}")
        labels[item_id] = _refuge_label(row.get(label_col, ""), f"{csv_path}:{line} ({item_id})")
    return labels


# The challenge's three parts, recognised by a folder name below data.path that contains the word
# (REFUGE-Training400, Annotation-Training400, REFUGE-Validation400, REFUGE-Test400, ...).
REFUGE_PARTS = {"train": "Training", "validation": "Validation", "test": "Test"}
_REFUGE_PART_WORDS = {"train": "train", "validation": "valid", "test": "test"}
# The official split: Training trains, Test tests, and the Validation set is divided into the
# validation split (model selection) and the calibration split, in the ratio of their shares.
REFUGE_OFFICIAL = {"train": "train", "test": "test"}
REFUGE_VALIDATION_POOL = ("val", "calib")


def refuge_part(path: Path, root: Path) -> str | None:
    """The challenge part (a key of :data:`REFUGE_PARTS`) that ``path`` lies in: the first folder
    below ``root`` whose name contains exactly one of the words training, validation or test."""
    for folder in path.relative_to(root).parts[:-1]:
        name = _norm(folder)
        found = [part for part, word in _REFUGE_PART_WORDS.items() if word in name]
        if len(found) == 1:
            return found[0]
    return None


def _refuge_given_split(parts: dict[str, str | None], paths: dict[str, Path]) -> tuple[GivenSplit | None, str]:
    """The official split when every image lies in one of the three parts and each part has
    images; else None and why."""
    present = {part for part in parts.values() if part is not None}
    if present != set(REFUGE_PARTS):
        found = ", ".join(REFUGE_PARTS[p] for p in REFUGE_PARTS if p in present) or "none of them"
        return None, f"the challenge's Training, Validation and Test folders are not all present (found: {found})"
    outside = sorted(item_id for item_id, part in parts.items() if part is None)
    if outside:
        return None, (f"{len(outside)} image(s) lie outside the Training, Validation and Test folders "
                      f"(e.g. {paths[outside[0]]})")
    assignment = {item_id: REFUGE_OFFICIAL.get(part, part) for item_id, part in parts.items()}  # type: ignore[arg-type]
    description = ("REFUGE official split: the challenge's Training set is train and its Test set is test; val and "
                   "calib are drawn from its Validation set, stratified by label and seeded (data.seed), in the ratio "
                   "data.split.val : data.split.calib")
    return GivenSplit(assignment, description, pools={"validation": REFUGE_VALIDATION_POOL}), "the challenge's split"


def refuge_source(data: DataParams) -> RefugeSource:
    """List and pair a REFUGE release under ``data.path`` (either layout, or both)."""
    if list(data.mask_classes) != list(FUNDUS_MASK_CLASSES):
        raise ConfigError(f"data.mask_classes: the refuge source has mask classes {list(FUNDUS_MASK_CLASSES)}, "
                          f"got {data.mask_classes}")
    root = _data_root(data)
    all_dirs = [p for p in root.rglob("*") if p.is_dir() and not _is_hidden(p, root)]
    mask_dirs = [p for p in all_dirs if _norm(p.name) == "disccupmasks"]
    if not mask_dirs:
        raise DataError(f"{root}: no Disc_Cup_Masks folder found (REFUGE layout expected)")

    def excluded(p: Path) -> bool:
        # Masks and the annotation overlays are images too; they are never inputs.
        return any(_norm(part) == "disccupmasks" or "illustration" in part.lower()
                   for part in p.relative_to(root).parts)

    masks = _index_by_stem((m for d in mask_dirs for m in _files(d, MASK_EXTENSIONS, recursive=True)), "mask")
    class_dirs = [d for d in all_dirs if _norm(d.name) in ("glaucoma", "nonglaucoma") and not excluded(d)]

    labelled: list[tuple[Path, int]] = []
    layouts = []
    if class_dirs:
        layouts.append("Training400 (class folders)")
        for d in class_dirs:
            label = 1 if _norm(d.name) == "glaucoma" else 0
            labelled += [(p, label) for p in _files(d, IMAGE_EXTENSIONS)]
    # Images outside class folders (Validation400 / Test400 style) are labelled by a CSV.
    flat = [p for p in _files(root, IMAGE_EXTENSIONS, recursive=True)
            if not excluded(p) and not any(p.is_relative_to(d) for d in class_dirs)]
    if flat or not class_dirs:
        layouts.append("flat (label CSV)")
        csvs = [p for p in _files(root, (".csv",), recursive=True) if not excluded(p)]
        if len(csvs) > 1:
            csvs = [p for p in csvs if "label" in p.name.lower() or "glaucoma" in p.name.lower()] or csvs
        if not csvs:
            raise DataError(f"{root}: no Glaucoma/Non-Glaucoma folders and no label CSV found (REFUGE layout expected)"
                            if not class_dirs else
                            f"{root}: {len(flat)} image(s) outside the Glaucoma/Non-Glaucoma folders (e.g. {flat[0]}) "
                            "and no label CSV for them")
        labels: dict[str, int] = {}
        label_files: dict[str, Path] = {}
        for csv_path in csvs:  # e.g. one for Validation400 and one for Test400
            for item_id, label in _refuge_labels_csv(csv_path).items():
                if item_id in labels:
                    raise DataError(f"{csv_path}: duplicate id {item_id!r} (also in {label_files[item_id]})")
                labels[item_id], label_files[item_id] = label, csv_path
        for p in flat:
            if p.stem not in labels:
                raise DataError(f"{p}: missing label (no row for {p.stem!r} in {', '.join(str(c) for c in csvs)})")
            labelled.append((p, labels[p.stem]))

    if not labelled:
        raise DataError(f"{root}: no images found (extensions {list(IMAGE_EXTENSIONS)})")
    seen: dict[str, Path] = {}
    parts: dict[str, str | None] = {}
    items: list[tuple[str, Path, Path, int]] = []
    for image_path, label in labelled:
        part = refuge_part(image_path, root)
        if image_path.stem in seen:
            other = seen[image_path.stem]
            if parts[image_path.stem] != part:
                raise DataError(f"{image_path}: image {image_path.stem!r} is in two splits: "
                                f"{REFUGE_PARTS.get(parts[image_path.stem] or '', 'no part')} ({other}) and "
                                f"{REFUGE_PARTS.get(part or '', 'no part')} ({image_path})")
            raise DataError(f"{image_path}: duplicate image id {image_path.stem!r} (also {other})")
        seen[image_path.stem], parts[image_path.stem] = image_path, part
        mask_path = masks.get(image_path.stem)
        if mask_path is None:
            raise DataError(f"{image_path}: no mask (expected Disc_Cup_Masks/.../{image_path.stem}.bmp)")
        items.append((image_path.stem, image_path, mask_path, label))
    items.sort(key=lambda t: t[0])
    given, note = _refuge_given_split(parts, seen)
    counts = {REFUGE_PARTS[p]: sum(v == p for v in parts.values()) for p in REFUGE_PARTS}
    log.info("refuge: %s layout, %d images under %s (%s)%s", " + ".join(layouts), len(items), root,
             ", ".join(f"{k} {v}" for k, v in counts.items()), "" if given else f"; no official split: {note}")
    source = RefugeSource(items, data.image_size, list(FUNDUS_CLASS_NAMES), list(FUNDUS_MASK_CLASSES))
    source.given_split, source.split_note = given, note
    return source


class FolderSource(_FileSource):
    """The generic ``images/``, ``masks/``, ``labels.csv`` layout (see the module docstring)."""

    name = "folder"

    def __init__(self, items: list[tuple[str, Path, Path, int]], image_size: int, class_names: list[str],
                 mask_classes: list[str], mask_values: dict[int, int] | None, positive_class: int):
        super().__init__(items, image_size, class_names, mask_classes)
        self.mask_values = mask_values
        self.positive_class = positive_class

    def _read_mask(self, mask_path: Path) -> np.ndarray:
        return read_mask_values(mask_path, grey=False)

    def _mask_classes(self, raw: np.ndarray, mask_path: Path) -> np.ndarray:
        num_classes = len(self.mask_classes)
        values = np.unique(raw)
        if self.mask_values is None:
            bad = values[(values < 0) | (values >= num_classes)]
            if bad.size:
                raise DataError(
                    f"{mask_path}: mask value(s) {bad[:10].tolist()} outside the declared classes "
                    f"0..{num_classes - 1} {self.mask_classes} (map pixel values with data.mask_values)"
                )
            return raw.astype(np.uint8, copy=False)
        bad = [int(v) for v in values if int(v) not in self.mask_values]
        if bad:
            raise DataError(
                f"{mask_path}: mask value(s) {bad[:10]} not in data.mask_values {sorted(self.mask_values)}"
            )
        lut = np.zeros(int(values.max()) + 1, np.uint8)
        for value, cls in self.mask_values.items():
            if value < lut.size:
                lut[value] = cls
        return lut[raw]


def _folder_class_names(raw_labels: dict[str, str], declared: list[str] | None, csv_path: Path) -> tuple[list[str], dict[str, int]]:
    """Class names in index order and the label -> index map (see the module docstring)."""
    unique = sorted(set(raw_labels.values()))
    if declared is not None:
        mapping = {name: i for i, name in enumerate(declared)}
        for value in unique:
            if value in mapping:
                continue
            try:
                index = int(value)
            except ValueError:
                index = -1
            if 0 <= index < len(declared):
                mapping[value] = index
        return list(declared), mapping
    try:
        numeric = sorted(unique, key=int)  # all integers: numeric order, "10" after "9"
    except ValueError:
        numeric = None
    names = numeric if numeric is not None else unique
    if len(names) < 2:
        raise DataError(f"{csv_path}: needs at least two distinct labels to train a classifier, found {names} "
                        "(or set data.class_names)")
    return names, {name: i for i, name in enumerate(names)}


def _folder_positive_class(class_names: list[str], data: DataParams, csv_path: Path) -> int:
    """The index of the class the binary metrics score: ``data.positive_class`` when set, else the
    last of the declared ``data.class_names``, else the largest integer label. Text labels read
    from the CSV have no natural order, so there it must be declared, never guessed."""
    if data.positive_class is not None:
        if data.positive_class not in class_names:
            raise ConfigError(f"data.positive_class: {data.positive_class!r} is not one of the classes {class_names}")
        return class_names.index(data.positive_class)
    if data.class_names is None and not all(name.lstrip("-").isdigit() for name in class_names):
        raise ConfigError(
            f"data.positive_class: {csv_path} has text labels {class_names}; set data.positive_class to the class "
            f"that sensitivity, F1 and AUC score (e.g. data.positive_class: {class_names[-1]!r}), or list "
            "data.class_names with that class last")
    return len(class_names) - 1


def folder_source(data: DataParams) -> FolderSource:
    """List and pair ``images/``, ``masks/`` and ``labels.csv`` under ``data.path``."""
    if data.mask_values is not None:
        bad = {v: c for v, c in data.mask_values.items() if not 0 <= c < len(data.mask_classes)}
        if bad:
            raise ConfigError(f"data.mask_values: class index(es) {bad} outside 0..{len(data.mask_classes) - 1} "
                              f"(data.mask_classes: {data.mask_classes})")
    root = _data_root(data)
    images_dir = _require_dir(root / "images", "images")
    masks_dir = _require_dir(root / "masks", "masks")
    csv_path = root / "labels.csv"
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: label file not found (expected a CSV with header id,label)")

    header, rows = _read_csv(csv_path)
    if [h.lower() for h in header[:2]] != ["id", "label"]:
        raise DataError(f"{csv_path}: header must start with id,label, got {','.join(header)}")
    split_column = next((h for h in header[2:] if _norm(h) == SPLIT_COLUMN), None)
    raw_labels: dict[str, str] = {}
    raw_splits: dict[str, tuple[str, int]] = {}  # id -> (split as written, line)
    for line, row in enumerate(rows, start=2):
        item_id = _strip_image_ext(row.get(header[0], ""))
        if not item_id:
            continue
        split = row.get(split_column, "") if split_column else ""
        if item_id in raw_labels:
            first, first_line = raw_splits[item_id]
            if split_column and first.lower() != split.lower():
                raise DataError(f"{csv_path}:{line}: image {item_id!r} is in two splits: {first!r} (line {first_line}) "
                                f"and {split!r} (line {line})")
            raise DataError(f"{csv_path}:{line}: duplicate id {item_id!r}")
        raw_labels[item_id] = row.get(header[1], "")
        raw_splits[item_id] = (split, line)

    images = _index_by_stem(_files(images_dir, IMAGE_EXTENSIONS), "image")
    skipped = [p.name for p in images_dir.iterdir()
               if p.is_file() and not p.name.startswith(".") and p.suffix.lower() not in IMAGE_EXTENSIONS]
    if skipped:
        log.warning("folder: ignoring %d non-image file(s) in %s (e.g. %s)", len(skipped), images_dir, skipped[:3])
    if not images:
        raise DataError(f"{images_dir}: no images found (extensions {list(IMAGE_EXTENSIONS)})")
    masks = _index_by_stem(_files(masks_dir, MASK_EXTENSIONS), "mask")
    labelled = {k: v for k, v in raw_labels.items() if k in images}
    class_names, mapping = _folder_class_names(labelled, data.class_names, csv_path)

    items: list[tuple[str, Path, Path, int]] = []
    for item_id, image_path in sorted(images.items()):
        mask_path = masks.get(item_id)
        if mask_path is None:
            raise DataError(f"{image_path}: no mask (expected {masks_dir / item_id}.png)")
        if item_id not in raw_labels:
            raise DataError(f"{image_path}: missing label (no row for {item_id!r} in {csv_path})")
        value = raw_labels[item_id]
        if not value:
            raise DataError(f"{csv_path}: missing label for {item_id!r} ({image_path})")
        if value not in mapping:
            raise DataError(f"{csv_path}: unknown label {value!r} for {item_id!r} ({image_path}); "
                            f"class names are {class_names}")
        items.append((item_id, image_path, mask_path, mapping[value]))
    orphans = sorted(set(raw_labels) - set(images))
    if orphans:
        log.warning("folder: %d label rows have no image in %s (e.g. %s)", len(orphans), images_dir, orphans[:3])
    positive_class = _folder_positive_class(class_names, data, csv_path)
    log.info("folder: %d images under %s, classes %s", len(items), root, class_names)
    source = FolderSource(items, data.image_size, class_names, list(data.mask_classes), data.mask_values, positive_class)
    if split_column is None:
        source.split_note = f"{csv_path} has no split column"
    elif data.split.method == "random":
        log.info("folder: data.split.method is random: the split column of %s is not used", csv_path)
        source.split_note = f"the split column of {csv_path} (not used: data.split.method is random)"
    else:
        source.given_split = _folder_given_split(csv_path, [item[0] for item in items], raw_splits)
        source.split_note = f"the split column of {csv_path}"
    return source


def _folder_given_split(csv_path: Path, ids: list[str], raw_splits: dict[str, tuple[str, int]]) -> GivenSplit:
    """The split column's assignment of the images ``ids``; every value must be a split name and
    every split must receive an image."""
    assignment: dict[str, str] = {}
    for item_id in ids:
        value, line = raw_splits[item_id]
        name = value.strip().lower()
        if not name:
            raise DataError(f"{csv_path}:{line}: no split for {item_id!r}; the split column needs one of "
                            f"{', '.join(SPLIT_NAMES)} in every row (or set data.split.method: random)")
        if name not in SPLIT_NAMES:
            raise DataError(f"{csv_path}:{line}: unknown split {value!r} for {item_id!r}; use one of "
                            f"{', '.join(SPLIT_NAMES)}")
        assignment[item_id] = name
    counts = {name: sum(v == name for v in assignment.values()) for name in SPLIT_NAMES}
    empty = [name for name, count in counts.items() if count == 0]
    if empty:
        raise DataError(f"{csv_path}: the split column leaves split(s) {empty} empty "
                        f"({', '.join(f'{k} {v}' for k, v in counts.items())}); every split needs at least one image "
                        "(calib is the calibrate stage's), or set data.split.method: random")
    return GivenSplit(assignment, f"the split column of {csv_path}")
