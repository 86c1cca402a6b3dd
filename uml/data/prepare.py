"""The ``prepare`` stage as a library function: raw data (or the generator) -> ``dataset.zarr``.

Decoding and resizing (or generating) the images is what takes the time; with
``data.prepare_workers`` above one (:func:`prepare_processes`) it runs in that many worker
processes (:class:`ParallelShards`). Each worker builds the records of one shard file of the store
(the source's ``record(i)``, as one process would build them), checks them and writes the shard
itself, compressed; this process collects the shards' summaries (ids, labels, pixel sums,
digests) in order. The shards depend on the data only, so the store, its files and its content
hash are the same for any number of processes.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import os
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from uml.config import DataParams, Params, Paths
from uml.data.importers import folder_source, refuge_source
from uml.data.records import (FUNDUS_CLASS_NAMES, FUNDUS_MASK_CLASSES, FUNDUS_POSITIVE_CLASS, GivenSplit, Record,
                              RecordSource)
from uml.data.store import (SPLIT_NAMES, RecordCheck, ShardSummary, given_split_sizes, open_prepared, shared_copy,
                            write_dataset, write_shard)
from uml.data.synthetic import SyntheticSource
from uml.errors import ConfigError

log = logging.getLogger(__name__)

# data.prepare_workers: null takes one process per CPU, at most this many ...
MAX_AUTO_WORKERS = 8
# ... and at most one per this many images.
IMAGES_PER_WORKER = 64
# Shard tasks in flight per worker: enough to keep the workers busy; each hands back only a
# small summary, so memory does not grow with the data set.
SHARDS_AHEAD = 2


@runtime_checkable
class IndexedSource(Protocol):
    """A record source that builds any record by its index (every source of this package does)."""

    def __len__(self) -> int: ...

    def record(self, index: int) -> Record: ...


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the system has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def prepare_processes(data: DataParams, num_images: int) -> int:
    """How many processes decode the images: ``data.prepare_workers``, or for null one per
    available CPU, at most :data:`MAX_AUTO_WORKERS` and one per :data:`IMAGES_PER_WORKER` images."""
    if data.prepare_workers is not None:
        return data.prepare_workers
    return max(1, min(available_cpus(), MAX_AUTO_WORKERS, num_images // IMAGES_PER_WORKER))


_worker_source: IndexedSource | None = None


def _set_worker_source(source: IndexedSource) -> None:
    global _worker_source
    _worker_source = source


def _write_shard_task(path: Path, shard: range, check: RecordCheck) -> ShardSummary:
    assert _worker_source is not None, "the pool's initializer sets the source"
    source = _worker_source
    return write_shard(path, shard, (source.record(i) for i in shard), check)


def _fresh_process_context() -> multiprocessing.context.BaseContext:
    """Worker processes that do not inherit this one's threads (zarr's event loop, tqdm's
    monitor): forked from a server process that has imported this module once (``forkserver``,
    so a second pool starts without importing it again), or spawned where there is none."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


def start_process_server() -> None:
    """Start the server that forks the worker processes (:func:`_fresh_process_context`) now,
    so that it imports this module while this process does other work; a pool made later finds
    it running. Nothing to start where processes are spawned."""
    import multiprocessing.forkserver

    if _fresh_process_context().get_start_method() == "forkserver":
        multiprocessing.forkserver.ensure_running()


class ParallelShards:
    """The records of ``source``, built, checked and written a shard at a time by ``workers``
    processes (a :class:`~uml.data.store.ShardedRecords` for :func:`~uml.data.store.write_dataset`).

    At most :data:`SHARDS_AHEAD` shards per worker are in flight, and their summaries come back
    in shard order. The processes are not forked from this process and its threads
    (:func:`_fresh_process_context`). An error raised while building or checking a record (an
    unreadable file) is raised here, in shard order, with its message, and the shards not yet
    started are cancelled."""

    def __init__(self, source: IndexedSource, workers: int):
        self.source = source
        self.workers = workers

    def __len__(self) -> int:
        return len(self.source)

    def write_shards(self, path: Path, shards: Sequence[range], check: RecordCheck) -> Iterator[ShardSummary]:
        remaining = iter(shards)
        pool = ProcessPoolExecutor(self.workers, mp_context=_fresh_process_context(),
                                   initializer=_set_worker_source, initargs=(self.source,))
        pending: deque[Future[ShardSummary]] = deque()
        try:
            for shard in itertools.islice(remaining, self.workers * SHARDS_AHEAD):
                pending.append(pool.submit(_write_shard_task, path, shard, check))
            while pending:
                summary = pending.popleft().result()
                following = next(remaining, None)
                if following is not None:
                    pending.append(pool.submit(_write_shard_task, path, following, check))
                yield summary
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def decoded_records(source: RecordSource, workers: int) -> RecordSource | ParallelShards:
    """``source`` as it is for one process (or a source that cannot build a record by index),
    else :class:`ParallelShards` over ``workers`` processes."""
    if workers <= 1 or not isinstance(source, IndexedSource):
        return source
    return ParallelShards(source, workers)


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
    if data.source == "synthetic" and prepare_processes(data, data.synthetic.num_images) > 1:
        # The workers' server imports this module (0.4 s) while this process imports scipy and
        # solves the synthetic population's mean (0.7 s), instead of after it.
        start_process_server()
    source = open_source(data)
    if data.source != "synthetic":
        note = dvc_tracking_note(Path(data.path))
        if note:
            log.warning("%s", note)
    given = choose_split(source, data)
    records = decoded_records(source, prepare_processes(data, len(source)))
    log.info("decoding %d images in %s", len(source),
             f"{records.workers} worker processes" if isinstance(records, ParallelShards) else "this process")
    attrs = write_dataset(
        records,
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
    paths = Paths(params)
    if paths.root_uri:
        shared_copy(out, paths.shared_dataset)
        open_prepared(paths.shared_dataset)  # the copy as a node reads it: every file against its recorded sha256
    return out


def _log_summary(out: Path, attrs: dict[str, Any]) -> None:
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
