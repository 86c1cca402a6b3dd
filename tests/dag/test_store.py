"""The prepared store of the miniature DAG, read with zarr directly (not through uml's reader) and
checked by value against docs/reference/data.md and the tiny params (tests/dag/miniature.py)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import zarr

from tests.dag.miniature import MiniDag

N, SIZE = 60, 64  # data.synthetic.num_images, data.image_size of TINY_DAG
SHARD = 4  # images per shard file
SPLITS = ("train", "val", "test", "calib")


@pytest.fixture(scope="module")
def store(miniature_dag: MiniDag) -> Path:
    return miniature_dag.data / "prepared" / "dataset.zarr"


@pytest.fixture(scope="module")
def arrays(store: Path) -> dict[str, np.ndarray]:
    group = zarr.open_group(store, mode="r")
    out = {name: group[name] for name in ("images", "masks", "labels")}
    out.update({f"splits/{s}": group[f"splits/{s}"] for s in SPLITS})
    return {"attrs": dict(group.attrs), **{k: (a.dtype, np.asarray(a[:])) for k, a in out.items()}}


def test_arrays_have_the_contracted_shapes_dtypes_and_values(arrays):
    (img_dtype, images), (mask_dtype, masks), (label_dtype, labels) = arrays["images"], arrays["masks"], arrays["labels"]
    assert (img_dtype, images.shape) == (np.dtype("uint8"), (N, SIZE, SIZE, 3))
    assert (mask_dtype, masks.shape) == (np.dtype("uint8"), (N, SIZE, SIZE))
    assert (label_dtype, labels.shape) == (np.dtype("int64"), (N,))
    assert set(np.unique(labels)) == {0, 1}
    # Every synthetic fundus has background, a rim and a cup, and nothing else.
    for i, mask in enumerate(masks):
        assert set(np.unique(mask)) == {0, 1, 2}, i
    # Real pictures, not zeros that zarr returns for a missing chunk: every image has contrast.
    assert (images.reshape(N, -1).std(axis=1) > 5).all()


def test_splits_are_disjoint_cover_the_set_and_are_stratified(arrays):
    splits = {s: arrays[f"splits/{s}"] for s in SPLITS}
    assert all(dtype == np.dtype("int64") for dtype, _ in splits.values())
    index = {s: idx for s, (_, idx) in splits.items()}
    assert {s: len(idx) for s, idx in index.items()} == {"train": 24, "val": 12, "test": 12, "calib": 12}  # 0.2 of 60 each
    joined = np.concatenate(list(index.values()))
    assert np.array_equal(np.sort(joined), np.arange(N))  # disjoint and covering: a permutation of 0..N-1
    assert all(np.array_equal(idx, np.sort(idx)) for idx in index.values())
    labels = arrays["labels"][1]
    share = labels.mean()
    for name, idx in index.items():  # stratified: each split's glaucoma share within one image of the whole's
        assert abs(labels[idx].sum() - share * len(idx)) <= 1, (name, labels[idx].sum(), share)
    assert 0 < labels[index["test"]].sum() < len(index["test"])  # both classes in the test split: AUCs exist


def test_attributes_and_fingerprint_recomputed_from_the_pixels(arrays):
    attrs = arrays["attrs"]
    images, masks, labels = arrays["images"][1], arrays["masks"][1], arrays["labels"][1]
    assert attrs["class_names"] == ["non-glaucoma", "glaucoma"]
    assert attrs["mask_classes"] == ["background", "disc", "cup"]
    assert (attrs["source"], attrs["image_size"], attrs["num_images"]) == ("synthetic", SIZE, N)
    fingerprint = attrs["fingerprint"]
    pixels = images.reshape(-1, 3).astype(np.float64) / 255.0
    np.testing.assert_allclose(fingerprint["channel_mean"], pixels.mean(axis=0), rtol=1e-9)
    np.testing.assert_allclose(fingerprint["channel_std"], pixels.std(axis=0), rtol=1e-6)
    assert fingerprint["class_counts"] == {"non-glaucoma": int((labels == 0).sum()), "glaucoma": int((labels == 1).sum())}
    frequencies = np.bincount(masks.ravel(), minlength=3) / masks.size
    assert fingerprint["mask_class_frequencies"] == pytest.approx(dict(zip(attrs["mask_classes"], frequencies)))


def test_content_hash_and_file_checksums_recompute(arrays, store):
    """Recomputed here from the definition in uml/data/store.py's docstring, with hashlib alone."""
    attrs = arrays["attrs"]
    images, masks, labels = arrays["images"][1], arrays["masks"][1], arrays["labels"][1]
    header = {"format": attrs["format"], "class_names": attrs["class_names"], "mask_classes": attrs["mask_classes"],
              "image_size": attrs["image_size"], "num_images": attrs["num_images"]}
    digest = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    # Images and masks are hashed shard by shard: 60 images in 15 shards of 4 (at least 16 shards
    # of ceil(60 / 16) = 4; 8 MiB would hold 682 images of 64 px).
    for pixels in (images, masks):
        digest.update(hashlib.sha256(b"".join(hashlib.sha256(pixels[start : start + SHARD].tobytes()).digest()
                                              for start in range(0, N, SHARD))).digest())
    digest.update(labels.astype("<i8").tobytes())
    for name in SPLITS:
        digest.update(name.encode())
        digest.update(arrays[f"splits/{name}"][1].astype("<i8").tobytes())
    assert attrs["content_hash"] == digest.hexdigest()

    # Every file but the group's own zarr.json (which holds the checksums) is recorded, with its sha256.
    files = {p.relative_to(store).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in store.rglob("*") if p.is_file()}
    assert files.pop("zarr.json")
    assert attrs["checksums"] == files
    # Sharded: one image per inner chunk, several per file (few files for DVC), as the contract says.
    meta = json.loads((store / "images" / "zarr.json").read_text())
    assert meta["chunk_grid"]["configuration"]["chunk_shape"] == [SHARD, SIZE, SIZE, 3]  # the shard
    assert meta["codecs"][0]["name"] == "sharding_indexed"
    assert meta["codecs"][0]["configuration"]["chunk_shape"] == [1, SIZE, SIZE, 3]
