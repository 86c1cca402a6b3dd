"""The prepared data set: ``data/prepared/dataset.zarr`` (docs/reference/data.md), its writer and its reader.

Layout (zarr v3 group):

* ``images`` uint8 (N, H, W, 3), ``masks`` uint8 (N, H, W): sharded, one image per inner chunk
  (fast random access), many images per shard file (few files for DVC).
* ``labels`` int64 (N,); ``splits/train``, ``splits/val``, ``splits/test``, ``splits/calib``
  int64 sorted indices into N, disjoint and covering N: drawn at random (stratified by label,
  seeded) or the data set's own (see :func:`given_split_indices`). ``calib`` is the calibration
  split of the post-hoc ``calibrate`` stage, used by nothing else.
* attrs: ``class_names``, ``mask_classes``, ``positive_class`` (the index of the class that the
  binary metrics score, as the data source declares it), ``source``, ``image_size``, ``fingerprint``
  (``channel_mean``/``channel_std`` per RGB channel on the [0, 1] scale, ``class_counts``,
  ``mask_class_frequencies``), ``content_hash``, plus ``format``, ``num_images``, ``ids``,
  ``split_method`` (``random``, or ``given``: the data set's own split), ``split_description``
  (how the split was made, in words), ``split_sizes``, ``split_fractions``, ``seed`` and
  source-specific ``source_info``.

``content_hash`` identifies the data content (downstream stages name training runs with it). It
is the sha256 of: a canonical JSON header (format, class names, mask classes, image size,
number of images), the sha256 of the images' shard digests (the sha256 of each shard's image
bytes, in shard order), the same for the masks, the labels and the split indices (little-endian
int64, splits in train/val/test/calib order). Digests per shard let processes that write
different shards hash them too (:func:`write_shard`); the shards (:func:`shard_ranges`) depend
on the number of images and their size only, so the hash does not depend on how many processes
wrote the store. :func:`compute_content_hash` recomputes it from a store.

The writer builds the store in a hidden sibling folder and renames it into place only when it is
complete, so an interrupted or failed run leaves no half-written store, and an existing store is
replaced only by a finished one.

Integrity: the writer records the sha256 of every file it wrote (shard and chunk files, array
metadata) in the ``checksums`` attr, and :func:`open_prepared` checks them before anything is
read. zarr reads a missing chunk or shard file as the fill value (black images, background masks,
label 0) without complaint, and a damaged one as garbage or a bare codec error; with the check,
either is a :class:`DataError` that names the array, the shard and the image indices it holds.
The check hashes the compressed files, not the decoded pixels: about 10 ms for the default data
set (320 images of 128 px, 8 MB on disk), and disk-read speed (roughly 1 s per GB) for larger
ones; a process checks a store once while its files keep their names, sizes and modification
times (one listing). ``content_hash`` is not recomputed at open (that decodes every image, several times slower);
:func:`compute_content_hash` does it on demand.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping, Sequence, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import zarr
from tqdm import tqdm
from zarr.codecs import ZstdCodec
from zarr.storage import FsspecStore, LocalStore

from uml import objectstore
from uml.config import SplitParams
from uml.data.records import SPLIT_NAMES, GivenSplit, Record
from uml.errors import DataError
from uml.objectstore import is_uri

log = logging.getLogger(__name__)

FORMAT = "uml-prepared/3"  # 3: the content hash folds in the images shard by shard
REQUIRED_ATTRS: tuple[str, ...] = ("class_names", "mask_classes", "positive_class", "source", "image_size", "fingerprint",
                                   "content_hash")
# The group's own metadata file holds the attrs (checksums included), so it is the one file not checksummed.
_ROOT_METADATA = "zarr.json"
_CHUNK_PREFIX = "/c/"  # zarr v3's default chunk key encoding: <array>/c/<i>/<j>/...
# Images per shard: about this many bytes of raw pixels per shard file. A shard is written whole,
# by one process that holds its pixels, so this bounds prepare's memory per process too.
SHARD_BYTES = 8 * 1024 * 1024
# ... and at least this many shards (when there are as many images), so that processes writing
# whole shards each get a fair share of the work.
MIN_SHARDS = 16
_RERUN = "run `python -m pipeline.prepare` first"


# ------------------------------------------------------------------------------------- split
def split_sizes(n: int, *, val: float, test: float, calib: float) -> dict[str, int]:
    """How many of ``n`` images each split gets: ``fraction * n`` rounded half up for the held-out
    splits, the rest for training. Raises :class:`DataError` when a split would be empty."""
    sizes = {name: math.floor(fraction * n + 0.5) for name, fraction in (("val", val), ("test", test), ("calib", calib))}
    sizes = {"train": n - sum(sizes.values()), **sizes}
    empty = [name for name in SPLIT_NAMES if sizes[name] <= 0]
    if empty:
        raise DataError(
            f"{n} image(s) are too few for the split (val {val}, test {test}, calib {calib}): split(s) {empty} "
            "would be empty"
        )
    return sizes


def _draw(idx: np.ndarray, count: int, labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` of ``idx`` drawn stratified by ``labels`` and seeded: ``(rest, drawn)``. When a
    class is too small to stratify on, the draw falls back to an unstratified one with a warning."""
    # Imported here: scikit-learn (with scipy) takes about a second to import, and readers of
    # the store never split.
    from sklearn.model_selection import train_test_split

    # Integer sizes: train_test_split takes them as they are (no rounding of a fraction).
    try:
        return train_test_split(idx, test_size=count, random_state=seed, stratify=labels[idx])
    except ValueError as exc:  # a class with a single member, or fewer held-out images than classes
        log.warning("stratified split not possible (%s); splitting without stratification", exc)
        return train_test_split(idx, test_size=count, random_state=seed, shuffle=True)


def split_indices(labels: np.ndarray, *, val: float, test: float, calib: float, seed: int) -> dict[str, np.ndarray]:
    """Stratified, seeded train/val/test/calib split of ``range(len(labels))`` (sorted index arrays).

    Sizes come from :func:`split_sizes`. The test split is drawn first, then the calibration
    split, then validation; training keeps the rest. When a class is too small to stratify on, a
    draw falls back to an unstratified one with a warning.
    """
    labels = np.asarray(labels)
    n = labels.shape[0]
    sizes = split_sizes(n, val=val, test=test, calib=calib)
    rest, test_idx = _draw(np.arange(n), sizes["test"], labels, seed)
    rest, calib_idx = _draw(rest, sizes["calib"], labels, seed)
    train_idx, val_idx = _draw(rest, sizes["val"], labels, seed)
    found = {"train": train_idx, "val": val_idx, "test": test_idx, "calib": calib_idx}
    return {name: np.sort(found[name]).astype(np.int64) for name in SPLIT_NAMES}


def _pool_sizes(n: int, splits: tuple[str, ...], split: SplitParams) -> dict[str, int]:
    """How many of a pool's ``n`` images each of ``splits`` gets: ``n`` in the ratio of their
    ``data.split`` shares (train's: what the others leave), rounded half up, the last split
    keeping the rest."""
    shares = {"val": split.val, "test": split.test, "calib": split.calib,
              "train": 1.0 - split.val - split.test - split.calib}
    total = sum(shares[name] for name in splits)
    sizes = {name: math.floor(n * shares[name] / total + 0.5) for name in splits[:-1]}
    sizes[splits[-1]] = n - sum(sizes.values())
    return sizes


def given_split_sizes(given: GivenSplit, split: SplitParams, source: str = "data set") -> dict[str, int]:
    """The size of each split that ``given`` makes (pools divided as :func:`given_split_indices`
    divides them). Raises :class:`DataError` naming ``source`` for a split name that is neither a
    split nor a pool, a pool that names an unknown split, or an empty split: bad split input
    stops ``prepare`` before any image is decoded."""
    for pool, targets in given.pools.items():
        unknown = [name for name in targets if name not in SPLIT_NAMES]
        if unknown or not targets:
            raise DataError(f"{source}: pool {pool!r} divides into {list(targets)}; the splits are {list(SPLIT_NAMES)}")
    counts: dict[str, int] = {}
    for item_id, name in given.assignment.items():
        if name not in SPLIT_NAMES and name not in given.pools:
            raise DataError(f"{source}: image {item_id!r} is assigned to the unknown split {name!r}; the splits are "
                            f"{list(SPLIT_NAMES)}")
        counts[name] = counts.get(name, 0) + 1
    sizes = {name: counts.get(name, 0) for name in SPLIT_NAMES}
    for pool, targets in given.pools.items():
        for name, size in _pool_sizes(counts.get(pool, 0), targets, split).items():
            sizes[name] += size
    empty = [name for name in SPLIT_NAMES if sizes[name] == 0]
    if empty:
        raise DataError(f"{source}: the given split ({given.description}) leaves split(s) {empty} empty "
                        f"({', '.join(f'{k} {v}' for k, v in sizes.items())}); every split needs at least one image "
                        "(calib is the calibrate stage's), or set data.split.method: random")
    return sizes


def given_split_indices(ids: list[str], labels: np.ndarray, given: GivenSplit, split: SplitParams, seed: int,
                        source: str = "data set") -> dict[str, np.ndarray]:
    """The split ``given`` defines, as sorted index arrays into ``ids``: every record goes to its
    assigned split, and each pool is divided among its splits, stratified by label and seeded
    (the first splits drawn in turn, the last keeping the rest). Raises :class:`DataError` for
    a record without an assignment, an assignment without a record, or an empty split."""
    labels = np.asarray(labels)
    given_split_sizes(given, split, source)
    missing = [item_id for item_id in ids if item_id not in given.assignment]
    if missing:
        raise DataError(f"{source}: {len(missing)} image(s) have no split in the given split (e.g. {missing[:3]})")
    unknown = sorted(set(given.assignment) - set(ids))
    if unknown:
        raise DataError(f"{source}: the given split names {len(unknown)} image(s) the data set does not have "
                        f"(e.g. {unknown[:3]})")
    by_name: dict[str, list[int]] = {}
    for i, item_id in enumerate(ids):
        by_name.setdefault(given.assignment[item_id], []).append(i)
    found = {name: np.asarray(by_name.get(name, []), np.int64) for name in SPLIT_NAMES}
    for pool, targets in given.pools.items():
        rest = np.asarray(by_name.get(pool, []), np.int64)
        sizes = _pool_sizes(rest.shape[0], targets, split)
        for name in targets[:-1]:
            if 0 < sizes[name] < rest.shape[0]:
                rest, drawn = _draw(rest, sizes[name], labels, seed)
            else:  # all or nothing: no draw to make (train_test_split refuses both)
                rest, drawn = (rest[:0], rest) if sizes[name] else (rest, rest[:0])
            found[name] = np.concatenate([found[name], drawn])
        found[targets[-1]] = np.concatenate([found[targets[-1]], rest])
    return {name: np.sort(found[name]).astype(np.int64) for name in SPLIT_NAMES}


# ------------------------------------------------------------------------------ content hash
def shard_digests(images: np.ndarray, masks: np.ndarray) -> tuple[bytes, bytes]:
    """sha256 of one shard's image bytes and of its mask bytes (uint8, C order)."""
    return (hashlib.sha256(np.ascontiguousarray(images, dtype=np.uint8).tobytes()).digest(),
            hashlib.sha256(np.ascontiguousarray(masks, dtype=np.uint8).tobytes()).digest())


class _ContentHasher:
    """Folds in the images' and masks' digests shard by shard, in shard order."""

    def __init__(self) -> None:
        self.images = hashlib.sha256()
        self.masks = hashlib.sha256()

    def update(self, image_digest: bytes, mask_digest: bytes) -> None:
        self.images.update(image_digest)
        self.masks.update(mask_digest)

    def hexdigest(self, *, labels: np.ndarray, splits: Mapping[str, np.ndarray], class_names: list[str],
                  mask_classes: list[str], image_size: int) -> str:
        header = {"format": FORMAT, "class_names": list(class_names), "mask_classes": list(mask_classes),
                  "image_size": int(image_size), "num_images": int(labels.shape[0])}
        h = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
        h.update(self.images.digest())
        h.update(self.masks.digest())
        h.update(np.asarray(labels, dtype="<i8").tobytes())
        for name in SPLIT_NAMES:
            h.update(name.encode())
            h.update(np.asarray(splits[name], dtype="<i8").tobytes())
        return h.hexdigest()


# ------------------------------------------------------------------------------------ writer
def shard_length(image_size: int, n: int) -> int:
    """Images per shard file: about :data:`SHARD_BYTES` of pixels, and at least
    :data:`MIN_SHARDS` shards when there are that many images. A function of the data only (never
    of the number of processes), so the files and the content hash are too."""
    per_image = image_size * image_size * 3
    return max(1, min(n, SHARD_BYTES // per_image, math.ceil(n / MIN_SHARDS)))


def shard_ranges(image_size: int, n: int) -> list[range]:
    """The image indices of each shard file, in order."""
    length = shard_length(image_size, n)
    return [range(start, min(start + length, n)) for start in range(0, n, length)]


@dataclass(frozen=True)
class RecordCheck:
    """What every record must be: its image size and the numbers of classes and mask classes."""

    image_size: int
    num_classes: int
    num_mask_classes: int


@dataclass(frozen=True)
class ShardSummary:
    """What the store's attrs need from one written shard: the records' ids, origins and labels,
    pixel sums for the fingerprint, and the shard's digests for the content hash."""

    ids: list[str]
    origins: list[str]
    labels: list[int]
    channel_sum: np.ndarray
    channel_sq: np.ndarray
    mask_counts: np.ndarray
    image_digest: bytes
    mask_digest: bytes


def write_shard(path: Path, shard: range, records: Iterable[Record], check: RecordCheck) -> ShardSummary:
    """Check the records of one shard (the images ``shard`` of the store being written at
    ``path``) and write them into its ``images`` and ``masks`` arrays.

    ``records`` are taken one at a time, up to ``len(shard)`` of them, so only the shard's own
    arrays are held. A source that runs out early writes nothing: the summary then holds fewer
    ids than the shard, which the caller reports. Every shard is one file per array and one call
    writes it whole, so calls for different shards may run at the same time in different processes.
    """
    s = check.image_size
    images = np.empty((len(shard), s, s, 3), np.uint8)
    masks = np.empty((len(shard), s, s), np.uint8)
    channel_sum, channel_sq = np.zeros(3, np.float64), np.zeros(3, np.float64)
    mask_counts = np.zeros(check.num_mask_classes, np.int64)
    ids: list[str] = []
    origins: list[str] = []
    labels: list[int] = []
    for k, rec in zip(range(len(shard)), records):
        _check_record(rec, s, check.num_classes, check.num_mask_classes)
        pixels = rec.image.reshape(-1, 3).astype(np.float64)
        channel_sum += pixels.sum(axis=0)
        channel_sq += np.einsum("ij,ij->j", pixels, pixels)
        mask_counts += np.bincount(rec.mask.ravel(), minlength=check.num_mask_classes)[: check.num_mask_classes]
        images[k], masks[k] = rec.image, rec.mask
        ids.append(rec.id)
        origins.append(rec.origin)
        labels.append(int(rec.label))
    if len(ids) == len(shard):
        store = LocalStore(path)
        zarr.open_array(store, path="images", mode="r+")[shard.start : shard.stop] = images
        zarr.open_array(store, path="masks", mode="r+")[shard.start : shard.stop] = masks
    image_digest, mask_digest = shard_digests(images[: len(ids)], masks[: len(ids)])
    return ShardSummary(ids=ids, origins=origins, labels=labels, channel_sum=channel_sum, channel_sq=channel_sq,
                        mask_counts=mask_counts, image_digest=image_digest, mask_digest=mask_digest)


@runtime_checkable
class ShardedRecords(Protocol):
    """Records that are built and written shard by shard elsewhere (worker processes): yields each
    shard's :class:`ShardSummary` in shard order, each shard written by :func:`write_shard`."""

    def __len__(self) -> int: ...

    def write_shards(self, path: Path, shards: Sequence[range], check: RecordCheck) -> Iterator[ShardSummary]: ...


def _shards_here(records: Iterable[Record], n: int, source: str, path: Path, shards: Sequence[range],
                 check: RecordCheck) -> Iterator[ShardSummary]:
    """Write ``records`` shard by shard in this process."""
    iterator = iter(records)
    for shard in shards:
        summary = write_shard(path, shard, iterator, check)
        if len(summary.ids) < len(shard):
            raise DataError(f"{source}: yielded {shard.start + len(summary.ids)} records, expected {n}")
        yield summary
    if next(iterator, None) is not None:
        raise DataError(f"{source}: yielded more records than its declared length {n}")


def _check_record(rec: Record, image_size: int, num_classes: int, num_mask_classes: int) -> None:
    image, mask = rec.image, rec.mask
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.shape != (image_size, image_size, 3):
        got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise DataError(f"{rec.origin}: image is {got}, expected uint8 ({image_size}, {image_size}, 3)")
    if not isinstance(mask, np.ndarray) or mask.dtype != np.uint8 or mask.shape != (image_size, image_size):
        got = f"{mask.dtype} {mask.shape}" if isinstance(mask, np.ndarray) else type(mask).__name__
        raise DataError(f"{rec.origin}: mask is {got}, expected uint8 ({image_size}, {image_size}) "
                        "(image/mask size mismatch?)")
    top = int(mask.max())
    if top >= num_mask_classes:
        bad = np.unique(mask[mask >= num_mask_classes])[:10].tolist()
        raise DataError(f"{rec.origin}: mask value(s) {bad} outside the declared classes 0..{num_mask_classes - 1}")
    if isinstance(rec.label, bool) or not isinstance(rec.label, (int, np.integer)) or not 0 <= rec.label < num_classes:
        raise DataError(f"{rec.origin}: label {rec.label!r} is not a class index in 0..{num_classes - 1}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def write_dataset(
    records: Iterable[Record] | ShardedRecords,
    out_path: str | os.PathLike[str],
    *,
    class_names: list[str],
    mask_classes: list[str],
    positive_class: int,
    source: str,
    image_size: int,
    split: SplitParams | Mapping[str, float],
    seed: int,
    source_info: Mapping[str, Any] | None = None,
    given: GivenSplit | None = None,
) -> dict[str, Any]:
    """Validate ``records`` and write them as the prepared store at ``out_path``; returns its attrs.

    ``positive_class`` indexes ``class_names`` (the source's :attr:`~uml.data.records.RecordSource.positive_class`).
    The split is ``given`` (a split the data set defines, see :func:`given_split_indices`) or,
    when that is None, a random one with ``split``'s ``val``, ``test`` and ``calib`` shares
    (:func:`split_indices`); ``split_method`` and ``split_description`` record which. Every record
    is checked (shape, dtype, mask values, label); the first bad one raises :class:`DataError`
    naming its origin, and nothing is left at ``out_path`` (an existing store there is kept). The
    same records, split and seed always give the same ``content_hash``.
    """
    split = split if isinstance(split, SplitParams) else SplitParams.model_validate(dict(split))
    class_names, mask_classes = [str(c) for c in class_names], [str(c) for c in mask_classes]
    out = Path(out_path).expanduser().absolute()
    if not isinstance(records, Sized):
        records = list(records)
    n = len(records)
    if n == 0:
        raise DataError(f"{source}: no images to prepare (the source is empty)")
    if not 0 <= positive_class < len(class_names):
        raise DataError(f"{source}: positive class {positive_class} is not an index of the classes {class_names}")
    if given is not None:
        given_split_sizes(given, split, source)  # bad split input fails before any image is decoded

    if out.exists() and not (out / "zarr.json").is_file():
        # Never delete something that is not a store (e.g. a mistyped data.root).
        raise DataError(f"{out}: exists and is not a zarr store; refusing to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial")
    old = out.with_name(f".{out.name}.old")
    for stale in (tmp, old):  # left behind by a run that was killed
        _remove(stale)
    try:
        attrs = _write(records, n, tmp, class_names=class_names, mask_classes=mask_classes,
                       positive_class=int(positive_class), source=source,
                       image_size=image_size, split=split, seed=seed, source_info=dict(source_info or {}),
                       given=given)
    except BaseException:
        _remove(tmp)
        raise
    # Swap in the finished store: the old one is moved aside first so a crash in between
    # leaves a complete store at one of the two names.
    if out.is_symlink():
        out.unlink()
    elif out.exists():
        out.rename(old)
    tmp.rename(out)
    _remove(old)
    return attrs


def _write(records: Iterable[Record] | ShardedRecords, n: int, path: Path, *, class_names: list[str], mask_classes: list[str],
           positive_class: int, source: str, image_size: int, split: SplitParams, seed: int, source_info: dict[str, Any],
           given: GivenSplit | None) -> dict[str, Any]:
    s = image_size
    shards = shard_ranges(s, n)
    shard = len(shards[0])
    group = zarr.create_group(store=LocalStore(path), zarr_format=3)
    compressors = ZstdCodec(level=3)
    group.create_array("images", shape=(n, s, s, 3), dtype="uint8", chunks=(1, s, s, 3), shards=(shard, s, s, 3),
                       compressors=compressors, dimension_names=["n", "y", "x", "c"])
    group.create_array("masks", shape=(n, s, s), dtype="uint8", chunks=(1, s, s), shards=(shard, s, s),
                       compressors=compressors, dimension_names=["n", "y", "x"])

    check = RecordCheck(image_size=s, num_classes=len(class_names), num_mask_classes=len(mask_classes))
    if isinstance(records, ShardedRecords):
        summaries = records.write_shards(path, shards, check)
    else:
        summaries = _shards_here(records, n, source, path, shards, check)
    hasher = _ContentHasher()
    labels = np.empty(n, np.int64)
    ids: list[str] = []
    seen: dict[str, str] = {}
    channel_sum = np.zeros(3, np.float64)
    channel_sq = np.zeros(3, np.float64)
    mask_counts = np.zeros(len(mask_classes), np.int64)
    with tqdm(total=n, desc=f"prepare ({source})", unit="img", mininterval=1.0) as bar:
        # strict: a source that yields more records than it declared raises when the shards end.
        for shard, summary in zip(shards, summaries, strict=True):
            for rec_id, origin in zip(summary.ids, summary.origins):
                if rec_id in seen:
                    raise DataError(f"{origin}: duplicate id {rec_id!r} (also {seen[rec_id]})")
                seen[rec_id] = origin
            ids.extend(summary.ids)
            labels[shard.start : shard.stop] = summary.labels
            channel_sum += summary.channel_sum
            channel_sq += summary.channel_sq
            mask_counts += summary.mask_counts
            hasher.update(summary.image_digest, summary.mask_digest)
            bar.update(len(shard))

    group.create_array("labels", data=labels, chunks=(n,), compressors=None, dimension_names=["n"])
    if given is None:
        splits = split_indices(labels, val=split.val, test=split.test, calib=split.calib, seed=seed)
        split_method = "random"
        split_description = (f"random: stratified by label, seed {seed}; test {split.test:g}, calib {split.calib:g} "
                             f"and val {split.val:g} of all images drawn in turn, train the rest")
    else:
        splits = given_split_indices(ids, labels, given, split, seed, source)
        split_method, split_description = "given", given.description
    for name in SPLIT_NAMES:
        group.create_array(f"splits/{name}", data=splits[name], chunks=(max(1, splits[name].shape[0]),),
                           compressors=None, dimension_names=["i"])

    num_pixels = float(n) * s * s
    mean = channel_sum / num_pixels
    std = np.sqrt(np.maximum(channel_sq / num_pixels - mean**2, 0.0))
    fingerprint = {
        "channel_mean": (mean / 255.0).tolist(),
        "channel_std": (std / 255.0).tolist(),
        "class_counts": {name: int((labels == k).sum()) for k, name in enumerate(class_names)},
        "mask_class_frequencies": {name: float(mask_counts[c] / num_pixels) for c, name in enumerate(mask_classes)},
    }
    attrs: dict[str, Any] = {
        "format": FORMAT,
        "class_names": class_names,
        "mask_classes": mask_classes,
        "positive_class": positive_class,
        "source": source,
        "source_info": source_info,
        "image_size": int(s),
        "num_images": int(n),
        "seed": int(seed),
        "split_method": split_method,
        "split_description": split_description,
        "split_fractions": {"val": float(split.val), "test": float(split.test), "calib": float(split.calib)},
        "split_sizes": {name: int(splits[name].shape[0]) for name in SPLIT_NAMES},
        "fingerprint": fingerprint,
        "content_hash": hasher.hexdigest(labels=labels, splits=splits, class_names=class_names,
                                         mask_classes=mask_classes, image_size=s),
        "ids": ids,
    }
    attrs["checksums"] = file_checksums(path)
    group.update_attributes(attrs)
    return attrs


def _sha256(path: Path) -> str:
    with path.open("rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()


def file_checksums(path: Path) -> dict[str, str]:
    """sha256 of every file of the store at ``path`` (relative POSIX path -> hex digest), except
    the group metadata that will hold them."""
    return {rel: _sha256(path / rel)
            for rel in sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
            if rel != _ROOT_METADATA}


# ------------------------------------------------------------------------------------ reader
# (store, digest of its recorded checksums and its files' listing) that this process has checked
# file by file.
_VERIFIED: set[tuple[str, str]] = set()


class PreparedData:
    """A validated, read-only view of a prepared store.

    ``images``, ``masks`` and ``labels`` are zarr arrays (read on indexing). The zarr handle is
    opened lazily and re-opened in a new process (e.g. a forked DataLoader worker) and dropped
    when pickled, so a handle is never shared across processes.
    """

    def __init__(self, path: str | os.PathLike[str], verify: bool = True):
        # A URI (the copy on object storage that prepare publishes) stays a string.
        self.path: Path | str = str(path) if is_uri(str(path)) else Path(path).expanduser().absolute()
        self._group: zarr.Group | None = None
        self._arrays: dict[str, zarr.Array] = {}
        self._pid: int | None = None
        self._fs: Any = None  # object storage: the filesystem that verifies the files (per process)
        self._fs_pid: int | None = None
        group = self._open()
        self.attrs: dict[str, Any] = dict(group.attrs)
        self._validate(group)
        if verify:
            self._verify_files(group)
        self._splits = {name: np.asarray(group[f"splits/{name}"][:], dtype=np.int64) for name in SPLIT_NAMES}
        self._validate_splits()

    # -- handle management
    def _open(self) -> zarr.Group:
        if self._group is None or self._pid != os.getpid():
            try:
                if isinstance(self.path, str):
                    store = FsspecStore.from_url(objectstore.without_options(self.path), read_only=True,
                                                 storage_options=objectstore.fsspec_options(self.path))
                else:
                    store = LocalStore(self.path, read_only=True)
                group = zarr.open_group(store=store, mode="r")
            except (FileNotFoundError, zarr.errors.BaseZarrError, ValueError, OSError) as exc:
                raise DataError(f"{self._name}: not a readable zarr group ({exc}); {_RERUN}") from None
            self._group, self._arrays, self._pid = group, {}, os.getpid()
        return self._group

    def _array(self, name: str) -> zarr.Array:
        # Cached per process: looking a member up re-reads its metadata from disk every time.
        group = self._open()
        if name not in self._arrays:
            self._arrays[name] = group[name]
        return self._arrays[name]

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_group"] = None
        state["_arrays"] = {}
        state["_pid"] = None
        state["_fs"] = state["_fs_pid"] = None
        return state

    @property
    def _name(self) -> str:
        return objectstore.describe(self.path) if isinstance(self.path, str) else str(self.path)

    def _remote_fs(self) -> Any:
        """The object store's filesystem, one per process (``self.path`` is a URI)."""
        if self._fs is None or self._fs_pid != os.getpid():
            self._fs, self._fs_pid = objectstore.filesystem(str(self.path)), os.getpid()
        return self._fs

    def _read_file(self, rel: str) -> bytes | None:
        """The bytes of the store's file ``rel`` (``None``: there is no such file)."""
        return read_store_file(str(self.path), rel, self._remote_fs() if isinstance(self.path, str) else None)

    def _listing(self) -> list[list[Any]]:
        """Each file of the store with its size and modification (time, or ETag on object storage)."""
        if isinstance(self.path, str):
            found = self._remote_fs().find(objectstore.bucket_path(self.path), detail=True)
            return sorted([name, info.get("size"), str(info.get("ETag", info.get("LastModified")))]
                          for name, info in found.items())
        return sorted([str(p), stat.st_size, stat.st_mtime_ns]
                      for p in self.path.rglob("*") if p.is_file() and (stat := p.stat()))

    # -- validation
    def _fail(self, problem: str) -> DataError:
        return DataError(f"{self._name}: {problem}; re-run `python -m pipeline.prepare`")

    def _validate(self, group: zarr.Group) -> None:
        if group.metadata.zarr_format != 3:
            raise self._fail(f"zarr format {group.metadata.zarr_format}, expected 3")
        missing = [k for k in REQUIRED_ATTRS if k not in self.attrs]
        if missing:
            raise self._fail(f"missing attributes {missing}")
        positive, classes = self.attrs["positive_class"], self.attrs["class_names"]
        if not isinstance(positive, int) or not 0 <= positive < len(classes):
            raise self._fail(f"positive_class {positive!r} is not an index of the classes {classes}")
        members = set(group.array_keys())
        expected = {"images": ("uint8", 4), "masks": ("uint8", 3), "labels": ("int64", 1)}
        for name, (dtype, ndim) in expected.items():
            if name not in members:
                raise self._fail(f"missing array '{name}'")
            arr = group[name]
            if str(arr.dtype) != dtype or arr.ndim != ndim:
                raise self._fail(f"array '{name}' is {arr.dtype} with {arr.ndim} dims, expected {dtype} with {ndim}")
        n, s = group["images"].shape[0], int(self.attrs["image_size"])
        if group["images"].shape != (n, s, s, 3):
            raise self._fail(f"images have shape {group['images'].shape}, expected ({n}, {s}, {s}, 3)")
        if group["masks"].shape != (n, s, s) or group["labels"].shape != (n,):
            raise self._fail(f"masks {group['masks'].shape} / labels {group['labels'].shape} do not match "
                             f"{n} images of {s}x{s}")
        if "splits" not in set(group.group_keys()):
            raise self._fail("missing group 'splits'")
        split_members = set(group["splits"].array_keys())
        for name in SPLIT_NAMES:
            if name not in split_members:
                raise self._fail(f"missing array 'splits/{name}'")

    def _verify_files(self, group: zarr.Group) -> None:
        """Check every file against the checksums recorded when the store was written: once per
        process while the files stay as they were (the same names, sizes and modification times,
        or object ETags, in one listing). A training worker opens the store three times in a
        second (its split, the training set, the validation set), and on object storage each
        check downloads the whole store."""
        checksums = self.attrs.get("checksums")
        if not isinstance(checksums, dict) or not checksums:
            raise self._fail("has no file checksums (written by an older uml), so a missing or damaged chunk "
                             "would go unnoticed")
        key = (self._name, hashlib.sha256(json.dumps([checksums, self._listing()], sort_keys=True).encode()).hexdigest())
        if key in _VERIFIED:
            return
        for rel, digest in checksums.items():
            content = self._read_file(rel)
            if content is None:
                raise self._fail(f"{self._describe_file(group, rel)}: file {rel} is missing (zarr would read it "
                                 "as zeros)")
            if hashlib.sha256(content).hexdigest() != digest:
                raise self._fail(f"{self._describe_file(group, rel)}: file {rel} is corrupt (its sha256 differs "
                                 "from the one recorded when the store was written)")
        _VERIFIED.add(key)

    @staticmethod
    def _describe_file(group: zarr.Group, rel: str) -> str:
        """``array 'images' shard 1 (images 16-31)`` for a chunk file, ``metadata of 'labels'`` otherwise."""
        if _CHUNK_PREFIX not in f"/{rel}":  # <array or group>/zarr.json
            return f"metadata of '{rel.rsplit('/', 1)[0]}'"
        name, key = f"/{rel}".split(_CHUNK_PREFIX, 1)
        name = name.lstrip("/")
        coords = tuple(int(part) for part in key.split("/"))
        array = group[name]
        per_file = (array.shards or array.chunks)[0]
        first = coords[0] * per_file
        last = min(array.shape[0], first + per_file) - 1
        kind = "shard" if array.shards else "chunk"
        what = "images" if name in ("images", "masks") else "entries"
        return f"array '{name}' {kind} {coords[0]} ({what} {first}-{last})"

    def _validate_splits(self) -> None:
        n = self.num_images
        joined = np.concatenate([self._splits[name] for name in SPLIT_NAMES])
        if joined.shape[0] != n or not np.array_equal(np.sort(joined), np.arange(n)):
            raise self._fail("splits are not disjoint or do not cover all images")
        for name in SPLIT_NAMES:
            if self._splits[name].shape[0] == 0:
                raise self._fail(f"split '{name}' is empty")

    # -- data
    @property
    def images(self) -> zarr.Array:
        return self._array("images")

    @property
    def masks(self) -> zarr.Array:
        return self._array("masks")

    @property
    def labels(self) -> zarr.Array:
        return self._array("labels")

    def split(self, name: str) -> np.ndarray:
        """Sorted int64 indices of split ``name`` (one of :data:`SPLIT_NAMES`)."""
        if name not in self._splits:
            raise DataError(f"{self._name}: unknown split {name!r}; the splits are {list(SPLIT_NAMES)}")
        return self._splits[name].copy()

    # -- metadata
    @property
    def num_images(self) -> int:
        return int(self.attrs["num_images"]) if "num_images" in self.attrs else int(self.images.shape[0])

    @property
    def class_names(self) -> list[str]:
        return list(self.attrs["class_names"])

    @property
    def mask_classes(self) -> list[str]:
        return list(self.attrs["mask_classes"])

    @property
    def positive_class(self) -> int:
        """Index of the class that the binary metrics score (declared by the data source)."""
        return int(self.attrs["positive_class"])

    @property
    def image_size(self) -> int:
        return int(self.attrs["image_size"])

    @property
    def content_hash(self) -> str:
        return str(self.attrs["content_hash"])

    @property
    def ids(self) -> list[str]:
        """Per-image identifiers (file stems for imported data)."""
        return list(self.attrs.get("ids", [str(i) for i in range(self.num_images)]))

    def __repr__(self) -> str:
        sizes = {name: int(self._splits[name].shape[0]) for name in SPLIT_NAMES}
        return f"PreparedData({self._name!r}, n={self.num_images}, size={self.image_size}, splits={sizes})"


def open_prepared(path: str | os.PathLike[str], verify: bool = True) -> PreparedData:
    """Open and validate the prepared store at ``path`` (a :class:`DataError` says what is wrong).

    ``verify`` checks every file against its recorded sha256 (see the module docstring for what it
    catches and costs); only code that has just verified the same store may skip it."""
    if is_uri(str(path)):
        uri = str(path)
        try:
            found = objectstore.filesystem(uri).exists(f"{objectstore.bucket_path(uri)}/{_ROOT_METADATA}")
        except OSError as exc:
            raise DataError(f"{objectstore.describe(uri)}: cannot reach the prepared data set ({exc})") from None
        if not found:
            raise DataError(f"{objectstore.describe(uri)}: prepared data set not found (prepare writes it there when "
                            f"data.root is this bucket); {_RERUN}")
        return PreparedData(uri, verify=verify)
    p = Path(path).expanduser()
    if not p.is_dir():
        raise DataError(f"{p}: prepared data set not found; {_RERUN}")
    return PreparedData(p, verify=verify)


def read_store_file(store: str, rel: str, fs: Any = None) -> bytes | None:
    """The bytes of the file ``rel`` of the store at ``store``, a folder or a URI (``None``: no
    such file). ``fs``: the URI's filesystem when the caller holds one."""
    if is_uri(store):
        try:
            return (fs or objectstore.filesystem(store)).cat_file(f"{objectstore.bucket_path(store)}/{rel}")
        except FileNotFoundError:
            return None
    file = Path(store) / rel
    return file.read_bytes() if file.is_file() else None


def shared_copy(local: Path, shared: str) -> str:
    """Where the nodes read the store (``Paths.shared_dataset``): ``local`` itself, or with
    ``data.root`` on object storage the copy there, first made equal to ``local``
    (:func:`publish_store`). Every stage that hands the store to other processes calls this, so a
    copy that went missing, or an older one, is replaced before anyone reads it, even when DVC
    did not re-run prepare."""
    if not is_uri(shared):
        return shared
    uri = shared
    copied = publish_store(local, uri)
    log.info("%s the prepared store on object storage: %s", "copied" if copied else "found an up-to-date copy of",
             objectstore.describe(uri))
    return uri


def publish_store(local: Path, uri: str) -> bool:
    """Copy the finished store at ``local`` to ``uri`` on object storage, unless the copy there is
    already this store; return whether it copied.

    The group's ``zarr.json`` holds the content hash and the sha256 of every other file, so equal
    bytes of that one object, with every other object there at its size (one listing), mean the
    same store; a damaged object of the right size is left to the checksum check of
    :func:`open_prepared`. ``zarr.json`` is the first object removed and the last one written: an
    interrupted copy leaves none, which :func:`open_prepared` reports as a store not found, never
    as a mixture of two stores."""
    fs = objectstore.filesystem(uri)
    remote = objectstore.bucket_path(uri)
    root_file = local / _ROOT_METADATA
    sizes = {p.relative_to(local).as_posix(): p.stat().st_size for p in local.rglob("*") if p.is_file()}
    try:
        if fs.exists(f"{remote}/{_ROOT_METADATA}"):
            if fs.cat_file(f"{remote}/{_ROOT_METADATA}") == root_file.read_bytes():
                found = {info["name"].removeprefix(f"{remote}/"): info["size"]
                         for info in fs.find(remote, detail=True).values()}
                if found == sizes:
                    return False
            fs.rm_file(f"{remote}/{_ROOT_METADATA}")
        if fs.exists(remote):
            fs.rm(remote, recursive=True)
        others = sorted(rel for rel in sizes if rel != _ROOT_METADATA)
        fs.put([str(local / rel) for rel in others], [f"{remote}/{rel}" for rel in others])
        fs.put_file(str(root_file), f"{remote}/{_ROOT_METADATA}")
    except OSError as exc:
        raise DataError(f"{objectstore.describe(uri)}: cannot write the prepared data set there ({exc})") from None
    return True


def take_images(data: PreparedData, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (n, S, S, 3) and masks (n, S, S) of the store indices ``idx``, in that order.

    One image at a time: with the store's one-image inner chunks, zarr reads an integer index
    from its shard directly. For a whole split of scattered indices that took 2.6 ms per 128 px
    image and mask, against 5.7 ms for an orthogonal selection (benchmarks/store_reads.py)."""
    images, masks = data.images, data.masks
    return (np.stack([np.asarray(images[int(i)]) for i in idx]),
            np.stack([np.asarray(masks[int(i)]) for i in idx]))


def load_split(path: str | os.PathLike[str] | PreparedData, name: str,
               limit: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Read a whole split into memory: ``(images (n,H,W,3) uint8, masks (n,H,W) uint8, labels (n,)
    int64, indices (n,) int64)``, the first ``limit`` images of the split when given."""
    data = path if isinstance(path, PreparedData) else open_prepared(path)
    idx = data.split(name)
    if limit is not None:
        idx = idx[: max(0, int(limit))]
    if idx.shape[0] == 0:
        s = data.image_size
        return (np.empty((0, s, s, 3), np.uint8), np.empty((0, s, s), np.uint8), np.empty(0, np.int64), idx)
    images, masks = take_images(data, idx)
    labels = np.asarray(data.labels[:], dtype=np.int64)[idx]
    return images, masks, labels, idx


class SplitReader:
    """A split of a prepared store read a batch at a time: ``labels`` and ``ids`` (the images'
    indices in the store) in memory, images and masks only as :meth:`read` asks for them, so a
    reader's memory does not grow with the split's images."""

    def __init__(self, data: PreparedData, name: str):
        self.data = data
        self.name = name
        self.ids = data.split(name)
        self.labels = np.asarray(data.labels[:], dtype=np.int64)[self.ids]
        self.image_size = data.image_size

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """uint8 images (b, S, S, 3) and masks (b, S, S) of the split's positions ``start:stop``."""
        idx = self.ids[start:stop]
        if idx.shape[0] == 0:
            s = self.image_size
            return np.empty((0, s, s, 3), np.uint8), np.empty((0, s, s), np.uint8)
        return take_images(self.data, idx)


def compute_content_hash(path: str | os.PathLike[str] | PreparedData) -> str:
    """Recompute ``content_hash`` from the arrays of a store (integrity check; equals the attr)."""
    data = path if isinstance(path, PreparedData) else open_prepared(path)
    hasher = _ContentHasher()
    # The store's own shard files, whatever the writer's rule for their length was.
    per_shard = data.images.shards[0]
    for start in range(0, data.num_images, per_shard):
        hasher.update(*shard_digests(np.asarray(data.images[start : start + per_shard]),
                                     np.asarray(data.masks[start : start + per_shard])))
    splits = {name: data.split(name) for name in SPLIT_NAMES}
    return hasher.hexdigest(labels=np.asarray(data.labels[:]), splits=splits, class_names=data.class_names,
                            mask_classes=data.mask_classes, image_size=data.image_size)
