"""The torch dataset over the store: item format, exact values, augmentation reproducibility, workers."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from torch.utils.data import DataLoader

from uml.config import AffineParams, AugmentParams, ColorParams, SplitParams, SyntheticParams
from uml.data.dataset import (EpochSampler, SegClsDataset, StepSampler, build_augmentation, to_model_input,
                              worker_init_fn)
from uml.data.store import file_checksums, open_prepared, write_dataset
from uml.data.synthetic import SyntheticSource
from uml.errors import DataError

SIZE = 32
FLIP_ONLY = AugmentParams(hflip=1.0, affine=AffineParams(p=0.0), color=ColorParams(p=0.0))
FULL = AugmentParams(hflip=0.5, affine=AffineParams(p=1.0), color=ColorParams(p=1.0))


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dataset") / "dataset.zarr"
    src = SyntheticSource(SyntheticParams(render_size=64), SIZE, seed=0, num_images=24)
    write_dataset(src, out, class_names=src.class_names, mask_classes=src.mask_classes,
                  positive_class=src.positive_class, source="synthetic",
                  image_size=SIZE, split=SplitParams(), seed=0)
    return out


def test_items_match_store(store: Path) -> None:
    data = open_prepared(store)
    idx = data.split("train")
    ds = SegClsDataset(store, idx)
    assert len(ds) == len(idx) and np.array_equal(ds.labels, np.asarray(data.labels[:])[idx])
    item = ds[2]
    assert set(item) == {"image", "mask", "label", "index"}
    # uint8 as stored: a quarter of the float32 bytes for images, an eighth of int64 for masks.
    assert item["image"].dtype == torch.uint8 and item["image"].shape == (SIZE, SIZE, 3)
    assert item["mask"].dtype == torch.uint8 and item["mask"].shape == (SIZE, SIZE)
    assert item["label"].dtype == torch.int64 and item["label"].ndim == 0
    assert item["index"].item() == idx[2]
    assert np.array_equal(item["image"].numpy(), np.asarray(data.images[idx[2]]))
    assert np.array_equal(item["mask"].numpy(), np.asarray(data.masks[idx[2]]))
    assert item["label"].item() == int(data.labels[idx[2]])


@pytest.mark.parametrize("channels_last", [False, True])
def test_model_input_is_each_stored_value_over_255_in_nchw(store: Path, channels_last: bool) -> None:
    data = open_prepared(store)
    batch = next(iter(DataLoader(SegClsDataset(store, [3, 7]), batch_size=2)))
    assert batch["image"].dtype == torch.uint8 and batch["mask"].dtype == torch.uint8
    x = to_model_input(batch["image"], torch.device("cpu"), channels_last=channels_last)
    # The float pipeline the dataset used to run per item: (3, H, W) float32 of value / 255.
    expected = np.stack([np.asarray(data.images[i]).transpose(2, 0, 1).astype(np.float32) / np.float32(255.0)
                         for i in (3, 7)])
    assert x.dtype == torch.float32 and x.shape == (2, 3, SIZE, SIZE)
    np.testing.assert_array_equal(x.numpy(), expected)
    assert x.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_bad_indices_and_missing_store(store: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="indices outside"):
        SegClsDataset(store, [0, 24])
    with pytest.raises(DataError, match="pipeline.prepare"):
        SegClsDataset(tmp_path / "nope.zarr", [0])


def _tampered(store: Path, tmp_path: Path, array: str, index: tuple[int, ...], value: int) -> Path:
    """A copy of ``store`` with one value of ``array`` changed and the checksums rewritten to match,
    so only the dataset's own check can notice (the writer refuses such values)."""
    copy = tmp_path / "tampered.zarr"
    shutil.copytree(store, copy)
    group = zarr.open_group(copy, mode="r+")
    group[array][index] = value
    group.update_attributes({"checksums": file_checksums(copy)})
    return copy


def test_a_label_outside_the_classes_is_refused_when_the_dataset_opens(store: Path, tmp_path: Path) -> None:
    bad = _tampered(store, tmp_path, "labels", (5,), 7)
    with pytest.raises(DataError, match=r"tampered.zarr: label\(s\) \[7\] of image\(s\) \[5\] are not class indices "
                                        r"in 0..1; re-run `python -m pipeline.prepare`"):
        SegClsDataset(bad, [0, 1])  # any split: the whole store's labels are checked once


def test_a_mask_value_outside_the_mask_classes_is_refused_when_the_item_loads(store: Path, tmp_path: Path) -> None:
    bad = _tampered(store, tmp_path, "masks", (3, 0, 0), 3)
    ds = SegClsDataset(bad, [2, 3])
    assert ds[0]["mask"].max() <= 2
    with pytest.raises(DataError, match=r"tampered.zarr: mask of image 3 holds value\(s\) \[3\] outside the mask "
                                        r"classes 0..2"):
        ds[1]


def test_flip_is_joint_and_exact(store: Path) -> None:
    plain, flipped = SegClsDataset(store, range(6)), SegClsDataset(store, range(6), augment=FLIP_ONLY)
    for i in range(6):
        a, b = plain[i], flipped[i]
        # (H, W, 3) images and (H, W) masks: the width axis is 1 for both.
        assert torch.equal(b["image"], a["image"].flip(1)) and torch.equal(b["mask"], a["mask"].flip(1))


def test_augmentation_reproducible_per_seed_epoch_rank(store: Path) -> None:
    a, b = SegClsDataset(store, range(8), augment=FULL, seed=1), SegClsDataset(store, range(8), augment=FULL, seed=1)
    first = [a[i]["image"] for i in range(8)]
    assert all(torch.equal(x, b[i]["image"]) for i, x in enumerate(first))
    # Order-independent: item 5 is the same whether read first or last.
    c = SegClsDataset(store, range(8), augment=FULL, seed=1)
    assert torch.equal(c[5]["image"], first[5])
    assert not torch.equal(SegClsDataset(store, range(8), augment=FULL, seed=2)[0]["image"], first[0])
    a.set_epoch(1)
    assert not torch.equal(a[0]["image"], first[0])
    a.set_epoch(0, rank=1)
    assert not torch.equal(a[0]["image"], first[0])
    a.set_epoch(0, rank=0)
    assert torch.equal(a[0]["image"], first[0])
    mask = a[3]["mask"]
    assert set(mask.unique().tolist()) <= {0, 1, 2}  # nearest interpolation keeps class indices


def test_augment_disabled_and_empty() -> None:
    assert build_augmentation(None) is None
    assert build_augmentation(AugmentParams(enabled=False)) is None
    assert build_augmentation(AugmentParams(hflip=0.0, affine=AffineParams(p=0.0), color=ColorParams(p=0.0))) is None
    names = [type(t).__name__ for t in build_augmentation(FULL).transforms]
    assert names == ["HorizontalFlip", "Affine", "ColorJitter"]


def test_pickle_drops_handles(store: Path) -> None:
    ds = SegClsDataset(store, range(5), augment=FULL, seed=3)
    _ = ds[0]
    state = ds.__getstate__()
    assert state["_data"] is None and state["_arrays"] is None
    clone = pickle.loads(pickle.dumps(ds))
    assert torch.equal(clone[4]["image"], ds[4]["image"]) and torch.equal(clone[4]["mask"], ds[4]["mask"])
    pickle.dumps(worker_init_fn)  # module level, usable with spawn/forkserver start methods


def _batches(ds: SegClsDataset, workers: int) -> list[dict[str, torch.Tensor]]:
    loader = DataLoader(ds, batch_size=4, shuffle=False, num_workers=workers, worker_init_fn=worker_init_fn,
                        multiprocessing_context="fork" if workers else None)
    return list(loader)


def test_same_batches_with_and_without_workers(store: Path) -> None:
    ds = SegClsDataset(store, open_prepared(store).split("train"), augment=FULL, seed=7)
    ds.set_epoch(2)
    _ = ds[0]  # the parent opened the store before the workers fork
    serial, parallel = _batches(ds, 0), _batches(ds, 2)
    assert len(serial) == len(parallel)
    for a, b in zip(serial, parallel, strict=True):
        for key in ("image", "mask", "label", "index"):
            assert torch.equal(a[key], b[key])


def test_persistent_workers_follow_the_epoch_through_the_sampler(store: Path) -> None:
    # Persistent workers keep the copy of the dataset they started with; the epoch reaches them
    # in the sampler's keys, so every epoch's batches are the in-process reads of that epoch.
    ds = SegClsDataset(store, range(8), augment=FULL, seed=5)
    sampler = EpochSampler(ds, num_replicas=1, rank=0, shuffle=False)
    loader = DataLoader(ds, batch_size=4, sampler=sampler, num_workers=2, worker_init_fn=worker_init_fn,
                        persistent_workers=True, multiprocessing_context="fork")
    epochs = []
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        images = torch.cat([b["image"] for b in loader])
        ds.set_epoch(epoch)
        assert torch.equal(images, torch.stack([ds[i]["image"] for i in range(8)])), epoch
        epochs.append(images)
    assert not torch.equal(epochs[0], epochs[1])
    assert next(iter(sampler)) == (1, 0, 0)  # (epoch, rank, position)


def _global_stream(n: int, world: int, batch: int, steps: int, epochs: int, seed: int = 3) -> tuple[list, list]:
    """Every rank's keys for ``epochs`` epochs, and the global stream they make: position
    ``e * T + k * world + r`` is rank ``r``'s ``k``-th draw of epoch ``e`` (``T`` draws per epoch)."""
    data = list(range(n))
    samplers = [StepSampler(data, num_replicas=world, rank=r, seed=seed, batch_size=batch, steps=steps) for r in range(world)]
    per_rank, stream = [], []
    for epoch in range(epochs):
        keys = []
        for sampler in samplers:
            sampler.set_epoch(epoch)
            keys.append(list(sampler))
        per_rank.append(keys)
        stream += [keys[r][k] for k in range(steps * batch) for r in range(world)]
    return per_rank, stream


def test_step_sampler_draws_a_fixed_number_of_batches_from_reshuffled_passes() -> None:
    n, world, batch, steps, epochs = 10, 2, 3, 4, 5  # 24 draws per epoch: 2.4 passes
    per_rank, stream = _global_stream(n, world, batch, steps, epochs)
    # Every rank draws steps * batch keys per epoch, whatever the data set's size.
    assert all(len(keys) == steps * batch for epoch in per_rank for keys in epoch)
    assert all(key[1] == r for epoch in per_rank for r, keys in enumerate(epoch) for key in keys)
    # The epochs continue one stream: each aligned run of n draws is one pass, every image exactly
    # once, keyed with its pass number; the ranks' shares of a pass are therefore disjoint.
    passes = [stream[i:i + n] for i in range(0, len(stream) - n + 1, n)]
    assert len(passes) == steps * batch * world * epochs // n == 12
    for number, draws in enumerate(passes):
        assert sorted(i for _, _, i in draws) == list(range(n)), number
        assert {p for p, _, _ in draws} == {number}
    # Reshuffled at every pass, and seeded: the same seed draws the same stream, another another.
    assert len({tuple(i for _, _, i in draws) for draws in passes}) == len(passes)
    assert _global_stream(n, world, batch, steps, epochs)[1] == stream
    assert _global_stream(n, world, batch, steps, epochs, seed=4)[1] != stream
    # An epoch does not depend on the ones before it (what a resume needs): epoch 3 alone.
    late = StepSampler(list(range(n)), num_replicas=world, rank=1, seed=3, batch_size=batch, steps=steps)
    late.set_epoch(3)
    assert list(late) == per_rank[3][1]


def test_step_sampler_keys_reach_persistent_workers(store: Path) -> None:
    # The pass in each key seeds the augmentation: an image drawn in two passes is augmented twice
    # differently, and persistent workers augment as the in-process reads of the same keys.
    ds = SegClsDataset(store, range(4), augment=FULL, seed=5)
    sampler = StepSampler(ds, num_replicas=1, rank=0, seed=0, batch_size=4, steps=2)  # 2 passes per epoch
    loader = DataLoader(ds, batch_size=4, sampler=sampler, num_workers=2, worker_init_fn=worker_init_fn,
                        persistent_workers=True, multiprocessing_context="fork")
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        keys = list(sampler)
        images = torch.cat([b["image"] for b in loader])
        assert torch.equal(images, torch.stack([ds[key]["image"] for key in keys])), epoch
        assert [p for p, _, _ in keys] == [2 * epoch] * 4 + [2 * epoch + 1] * 4
        first = {i: images[j] for j, (p, _, i) in enumerate(keys) if p == 2 * epoch}
        second = {i: images[j] for j, (p, _, i) in enumerate(keys) if p == 2 * epoch + 1}
        assert not any(torch.equal(first[i], second[i]) for i in range(4))
