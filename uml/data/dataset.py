"""The torch ``Dataset`` the training code reads: images, masks and labels from the prepared store,
with joint image+mask augmentation (albumentations).

Reproducibility of augmentation: albumentations 2 draws from generators owned by the ``Compose``
(``Compose(seed=...)``/``set_random_seed`` give *every* transform its own generator seeded with
the same value, so the transforms' coin flips are correlated; ``set_random_state`` shares one
generator pair between all transforms). This dataset hands the ``Compose`` a fresh shared
generator pair for every sample, seeded from ``(seed, epoch, rank, store index)``. The
augmentation of an image therefore depends only on those four numbers: not on the number of
DataLoader workers, which worker loads it, or the batch order. A DataLoader's workers hold a
copy of the dataset made when they start, and persistent workers keep it across epochs, so the
epoch reaches them with each sample's key: :class:`EpochSampler` yields ``(epoch, rank, index)``
keys (:class:`StepSampler`, which draws a fixed number of batches per epoch, yields
``(pass, rank, index)``). Reading items directly (``dataset[i]``) uses
:meth:`SegClsDataset.set_epoch`'s values. :func:`worker_init_fn` seeds the global ``random``/``numpy`` generators of each worker from
torch's per-worker seed (which mixes in the worker id) for any other code that uses them.

Transport: items stay uint8 as stored (an image is a quarter of its float32 size, a mask an
eighth of int64), so worker processes, shared memory and the host-to-device copy move 4-8x fewer
bytes; :func:`to_model_input` converts a batch to the model's float input on the device.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch
import zarr
from torch.utils.data import Dataset, DistributedSampler, get_worker_info

from uml.config import AugmentParams
from uml.data.store import PreparedData, open_prepared
from uml.errors import DataError
from uml.image_io import PIXEL_MAX
from uml.objectstore import is_uri


def build_augmentation(params: AugmentParams | None) -> A.Compose | None:
    """Joint image+mask training augmentation from ``data.augment`` (None when disabled or empty).

    Horizontal flip, a small affine (scale, translation, rotation; linear for the image, nearest
    for the mask, black/background outside) and colour jitter (image only).
    """
    if params is None or not params.enabled:
        return None
    transforms: list[A.BasicTransform] = []
    if params.hflip > 0:
        transforms.append(A.HorizontalFlip(p=params.hflip))
    aff = params.affine
    if aff.p > 0 and (aff.scale > 0 or aff.translate > 0 or aff.rotate > 0):
        transforms.append(
            A.Affine(
                scale=(1.0 - aff.scale, 1.0 + aff.scale),
                translate_percent=(-aff.translate, aff.translate),
                rotate=(-aff.rotate, aff.rotate),
                interpolation=cv2.INTER_LINEAR,
                mask_interpolation=cv2.INTER_NEAREST,
                border_mode=cv2.BORDER_CONSTANT,
                fill=0,
                fill_mask=0,  # background class outside the image
                p=aff.p,
            )
        )
    col = params.color
    if col.p > 0 and (col.brightness > 0 or col.contrast > 0 or col.saturation > 0 or col.hue > 0):
        transforms.append(
            A.ColorJitter(brightness=col.brightness, contrast=col.contrast, saturation=col.saturation,
                          hue=col.hue, p=col.p)
        )
    if not transforms:
        return None
    # The seed here is irrelevant: the random state is replaced for every sample.
    return A.Compose(transforms, seed=0)


def sample_seed(seed: int, epoch: int, rank: int, index: int) -> np.random.SeedSequence:
    """The seed sequence of one sample's augmentation."""
    return np.random.SeedSequence([int(seed), int(epoch), int(rank), int(index)])


class SegClsDataset(Dataset):
    """Images, masks and labels of ``indices`` of the prepared store at ``store_path``.

    Items are ``{"image": uint8 (H, W, 3) RGB, "mask": uint8 (H, W) class indices, "label": int64 (),
    "index": int64 ()}`` where ``index`` is the position in the store (a batch's images become the
    model's input through :func:`to_model_input`). An item's key is its position ``i`` in
    ``indices``, or ``(epoch, rank, i)`` from :class:`EpochSampler` (``(pass, rank, i)`` from
    :class:`StepSampler`: the first number keys the augmentation stream). ``augment`` (the
    ``data.augment`` params) enables training augmentation; None or ``enabled: false`` reads the
    images as stored.

    The store is validated when the dataset is built, including every label; each mask's values
    are checked when its item loads. These are the only range checks of labels and masks before
    the loss (see :func:`uml.evidential.one_hot`). Zarr handles are opened lazily in each
    process and dropped when the dataset is pickled (DataLoader workers, Ray), so none is shared
    across processes.
    """

    def __init__(self, store_path: str | os.PathLike[str], indices: Any, augment: AugmentParams | None = None,
                 seed: int = 0):
        # A folder, or the copy on object storage (a URI, which Path would mangle).
        self.store_path: Path | str = str(store_path) if is_uri(str(store_path)) else Path(store_path)
        data = open_prepared(self.store_path)
        self.indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = data.num_images
        if self.indices.size and (self.indices.min() < 0 or self.indices.max() >= n):
            raise DataError(f"{self.store_path}: indices outside 0..{n - 1}")
        self.class_names = data.class_names
        self.mask_classes = data.mask_classes
        self.positive_class = data.positive_class
        self.image_size = data.image_size
        # Labels are tiny: keep them in memory (also what samplers need).
        self._all_labels = np.asarray(data.labels[:], dtype=np.int64)
        # Labels and mask values are checked here, on the CPU, and nowhere downstream: a range
        # check in the loss would read the values back from the device at every step.
        num_classes = len(self.class_names)
        bad = np.flatnonzero((self._all_labels < 0) | (self._all_labels >= num_classes))
        if bad.size:
            raise DataError(f"{self.store_path}: label(s) {self._all_labels[bad[:5]].tolist()} of image(s) "
                            f"{bad[:5].tolist()} are not class indices in 0..{num_classes - 1}; re-run "
                            "`python -m pipeline.prepare`")
        self._num_mask_classes = len(self.mask_classes)
        self.augment = augment
        self.seed = int(seed)
        self.epoch = 0
        self.rank = 0
        self._transform = build_augmentation(augment)
        self._data: PreparedData | None = data
        self._arrays: tuple[int, zarr.Array, zarr.Array] | None = None

    # -- pickling / per-process handles
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_data"] = None
        state["_arrays"] = None
        return state

    def _store_arrays(self) -> tuple[zarr.Array, zarr.Array]:
        pid = os.getpid()
        if self._arrays is None or self._arrays[0] != pid:
            if self._data is None:
                self._data = PreparedData(self.store_path)
            self._arrays = (pid, self._data.images, self._data.masks)
        return self._arrays[1], self._arrays[2]

    # -- reproducibility
    def set_epoch(self, epoch: int, rank: int = 0) -> None:
        """Select the augmentation stream of ``epoch`` on distributed ``rank`` (see the module doc)."""
        self.epoch = int(epoch)
        self.rank = int(rank)

    # -- data
    @property
    def labels(self) -> np.ndarray:
        """Labels of this dataset's items, in item order."""
        return self._all_labels[self.indices]

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def __getitem__(self, key: int | tuple[int, int, int]) -> dict[str, torch.Tensor]:
        epoch, rank, i = key if isinstance(key, tuple) else (self.epoch, self.rank, key)
        index = int(self.indices[i])
        images, masks = self._store_arrays()
        image = np.asarray(images[index])
        mask = np.asarray(masks[index])
        if mask.max(initial=0) >= self._num_mask_classes:  # ~10 us per 256 px mask
            values = np.unique(mask[mask >= self._num_mask_classes])[:5].tolist()
            raise DataError(f"{self.store_path}: mask of image {index} holds value(s) {values} outside the mask "
                            f"classes 0..{self._num_mask_classes - 1}; re-run `python -m pipeline.prepare`")
        if self._transform is not None:
            seq = sample_seed(self.seed, epoch, rank, index)
            py_seed = int(seq.generate_state(1, np.uint64)[0])
            self._transform.set_random_state(np.random.default_rng(seq), random.Random(py_seed))
            out = self._transform(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image)),
            "mask": torch.from_numpy(np.ascontiguousarray(mask)),
            "label": torch.tensor(self._all_labels[index], dtype=torch.int64),
            "index": torch.tensor(index, dtype=torch.int64),
        }


class EpochSampler(DistributedSampler):
    """A :class:`~torch.utils.data.DistributedSampler` whose keys carry the epoch and rank:
    ``(epoch, rank, i)`` instead of ``i``. The sampler runs in the main process, where
    ``set_epoch`` is called, so the augmentation of persistent DataLoader workers follows the
    epoch. Still a ``DistributedSampler``, so Ray Train's ``prepare_data_loader`` keeps it."""

    def __iter__(self):
        return ((self.epoch, self.rank, i) for i in super().__iter__())


class StepSampler(EpochSampler):
    """A fixed number of draws per epoch, whatever the data set's size: ``steps`` batches of
    ``batch_size`` on each of ``num_replicas`` ranks, taken from an endless stream of passes over
    the data set. Each pass is a permutation seeded by ``(seed, pass)``, so the stream reshuffles
    when a pass ends, and epoch ``e`` takes the stream's positions ``[e * T, (e + 1) * T)`` with
    ``T = steps * batch_size * num_replicas``: which images an epoch draws depends only on the
    epoch (a resumed run draws what an uninterrupted one would have), and epochs follow each other
    through the stream without gaps or repeats. Rank ``r`` takes every ``num_replicas``-th
    position from ``r``: each global batch is ``batch_size * num_replicas`` consecutive positions,
    the ranks' shares are equal in length, and within a pass they are disjoint.

    Keys are ``(pass, rank, i)``: each image is drawn once per pass, so its augmentation (seeded
    by the key, see :class:`SegClsDataset`) differs at every draw. Still a
    ``DistributedSampler``, so Ray Train's ``prepare_data_loader`` keeps it."""

    def __init__(self, dataset: Dataset, *, num_replicas: int, rank: int, seed: int, batch_size: int, steps: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        if len(dataset) == 0:
            raise DataError("cannot draw training batches from an empty training split")
        self.steps, self.batch_size = int(steps), int(batch_size)
        self.num_samples = self.steps * self.batch_size
        self.total_size = self.num_samples * self.num_replicas

    def __len__(self) -> int:
        return self.num_samples

    def pass_order(self, index: int) -> np.ndarray:
        """Pass ``index``'s order of the data set's items."""
        return np.random.default_rng(np.random.SeedSequence([self.seed, index])).permutation(len(self.dataset))

    def epoch_positions(self) -> tuple[np.ndarray, np.ndarray]:
        """This rank's draws of the current epoch: ``(passes, items)``, the pass each draw belongs
        to and the item it draws (a position in the data set)."""
        n = len(self.dataset)
        start = self.epoch * self.total_size
        first, last = start // n, (start + self.total_size - 1) // n
        items = np.concatenate([self.pass_order(p) for p in range(first, last + 1)])
        passes = np.repeat(np.arange(first, last + 1), n)
        window = slice(start - first * n, start - first * n + self.total_size)
        mine = slice(self.rank, None, self.num_replicas)
        return passes[window][mine], items[window][mine]

    def __iter__(self):
        passes, items = self.epoch_positions()
        return ((int(p), self.rank, int(i)) for p, i in zip(passes, items, strict=True))


def to_model_input(images: torch.Tensor, device: torch.device | None = None,
                   channels_last: bool = False) -> torch.Tensor:
    """A batch of uint8 (B, H, W, 3) images as the model's float32 (B, 3, H, W) input, each value
    divided by :data:`~uml.image_io.PIXEL_MAX`, computed on ``device`` (the copy there moves
    uint8). ``channels_last`` gives the (B, 3, H, W) tensor channels-last strides, which the
    (B, H, W, 3) batch already has: no copy."""
    if device is not None:
        images = images.to(device, non_blocking=True)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    return images.permute(0, 3, 1, 2).contiguous(memory_format=layout).float().div_(PIXEL_MAX)


def worker_init_fn(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: per-worker global RNG seeds, fresh store handles.

    torch gives each worker the seed ``base_seed + worker_id`` (``base_seed`` drawn from the main
    process's torch generator, so it follows ``torch.manual_seed``). That seed is mixed with the
    worker id into Python's and numpy's global generators. The dataset's own augmentation does not
    depend on them (it is keyed per sample, see the module docstring).

    It deliberately leaves OpenCV's thread settings alone: ``cv2.setNumThreads`` in a forked
    worker whose parent already used OpenCV's thread pool can deadlock.
    """
    info = get_worker_info()
    base = info.seed if info is not None else torch.initial_seed()
    seq = np.random.SeedSequence([int(base) % (1 << 63), int(worker_id)])
    state = seq.generate_state(2, np.uint32)
    random.seed(int(state[0]))
    np.random.seed(int(state[1]))
    dataset = info.dataset if info is not None else None
    if isinstance(dataset, SegClsDataset):
        # A forked worker inherits the parent's objects; never reuse its zarr handles.
        dataset._arrays = None
