"""The prepared zarr store: layout, exact contents, splits, fingerprint, hash, atomic writes, reader."""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import pickle
from pathlib import Path

import numpy as np
import pytest
import zarr

from tests.data.helpers import disc_cup, rgb
from uml.config import SplitParams
from uml.data import store
from uml.data.records import Record
from uml.data.store import (
    PreparedData,
    compute_content_hash,
    load_split,
    open_prepared,
    split_indices,
    take_images,
    write_dataset,
)
from uml.errors import DataError

SIZE = 16
CLASSES = ["neg", "pos"]
MASK_CLASSES = ["background", "disc", "cup"]


def make_records(n: int, pos_every: int = 4) -> list[Record]:
    return [Record(id=f"r{i:03d}", image=rgb(SIZE, SIZE, i), mask=disc_cup(SIZE, SIZE, i),
                   label=int(i % pos_every == 0), origin=f"mem{i}") for i in range(n)]


def write(records: list[Record], out: Path, seed: int = 0, positive_class: int = 1, **kw: object) -> dict:
    return write_dataset(records, out, class_names=CLASSES, mask_classes=MASK_CLASSES, positive_class=positive_class,
                         source="test",
                         image_size=SIZE, split=SplitParams(val=0.2, test=0.2, calib=0.2), seed=seed, **kw)


def test_layout_and_exact_contents(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store, "SHARD_BYTES", 16 * SIZE * SIZE * 3)  # 16 images per shard: 16 + 16 + 8
    monkeypatch.setattr(store, "MIN_SHARDS", 1)
    records = make_records(40)
    out = tmp_path / "ds.zarr"
    attrs = write(records, out)
    group = zarr.open_group(str(out), mode="r")
    assert group.metadata.zarr_format == 3
    images, masks, labels = group["images"], group["masks"], group["labels"]
    assert (images.dtype, images.shape, images.chunks) == (np.uint8, (40, SIZE, SIZE, 3), (1, SIZE, SIZE, 3))
    assert images.shards == (16, SIZE, SIZE, 3) and masks.shards == (16, SIZE, SIZE)
    assert (masks.dtype, masks.shape, masks.chunks) == (np.uint8, (40, SIZE, SIZE), (1, SIZE, SIZE))
    assert labels.dtype == np.int64
    assert np.array_equal(images[:], np.stack([r.image for r in records]))
    assert np.array_equal(masks[:], np.stack([r.mask for r in records]))
    assert labels[:].tolist() == [r.label for r in records]
    on_disk = json.loads((out / "zarr.json").read_text())["attributes"]
    assert on_disk == json.loads(json.dumps(attrs))
    assert attrs["class_names"] == CLASSES and attrs["mask_classes"] == MASK_CLASSES
    assert (attrs["source"], attrs["image_size"], attrs["num_images"]) == ("test", SIZE, 40)
    assert attrs["ids"] == [r.id for r in records]
    # 40 images in 3 shard files (not 40 chunk files), likewise the masks.
    assert len([p for p in (out / "images").rglob("*") if p.is_file() and p.name != "zarr.json"]) == 3
    assert len([p for p in (out / "masks").rglob("*") if p.is_file() and p.name != "zarr.json"]) == 3


def test_splits_disjoint_covering_stratified(tmp_path: Path) -> None:
    attrs = write(make_records(40), tmp_path / "ds.zarr")
    data = open_prepared(tmp_path / "ds.zarr")
    splits = {name: data.split(name) for name in ("train", "val", "test", "calib")}
    joined = np.concatenate(list(splits.values()))
    assert sorted(joined.tolist()) == list(range(40))
    # round(0.2 * 40) = 8 in each held-out split, the rest (16) for training.
    assert {k: len(v) for k, v in splits.items()} == {"train": 16, "val": 8, "test": 8, "calib": 8} == attrs["split_sizes"]
    labels = np.asarray(data.labels[:])
    for idx in splits.values():
        assert np.all(np.diff(idx) > 0) and idx.dtype == np.int64
        assert labels[idx].mean() == pytest.approx(0.25, abs=0.05)  # 10 of 40 positive in every split


def test_fingerprint_matches_numpy(tmp_path: Path) -> None:
    records = make_records(12)
    fp = write(records, tmp_path / "ds.zarr")["fingerprint"]
    images = np.stack([r.image for r in records]).astype(np.float64) / 255.0
    masks = np.stack([r.mask for r in records])
    assert np.allclose(fp["channel_mean"], images.mean(axis=(0, 1, 2)), atol=1e-9)
    assert np.allclose(fp["channel_std"], images.std(axis=(0, 1, 2)), atol=1e-7)
    assert fp["class_counts"] == {"neg": 9, "pos": 3}
    freq = np.bincount(masks.ravel(), minlength=3) / masks.size
    assert [fp["mask_class_frequencies"][c] for c in MASK_CLASSES] == pytest.approx(freq.tolist())


def test_content_hash_deterministic_and_sensitive(tmp_path: Path) -> None:
    records = make_records(20)
    h1 = write(records, tmp_path / "a.zarr")["content_hash"]
    h2 = write(records, tmp_path / "b.zarr")["content_hash"]
    assert h1 == h2 and len(h1) == 64
    assert compute_content_hash(tmp_path / "a.zarr") == h1
    assert write(records, tmp_path / "c.zarr", seed=1)["content_hash"] != h1  # other split
    changed = list(records)
    img = changed[3].image.copy()
    img[0, 0, 0] ^= 1
    changed[3] = Record(changed[3].id, img, changed[3].mask, changed[3].label, changed[3].origin)
    assert write(changed, tmp_path / "d.zarr")["content_hash"] != h1
    # Byte-identical arrays on disk too (DVC sees no change on a re-run).
    chunk_a = sorted(p.relative_to(tmp_path / "a.zarr") for p in (tmp_path / "a.zarr").rglob("*") if p.is_file())
    for rel in chunk_a:
        assert (tmp_path / "a.zarr" / rel).read_bytes() == (tmp_path / "b.zarr" / rel).read_bytes()


def test_content_hash_follows_its_definition(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The documented recipe, computed here with hashlib from the records: the sha256 of a JSON
    # header, of the images' and the masks' shard digests, of the labels and of the splits.
    monkeypatch.setattr(store, "SHARD_BYTES", 8 * SIZE * SIZE * 3)
    monkeypatch.setattr(store, "MIN_SHARDS", 1)
    records = make_records(20)  # shards of 8, 8, 4
    attrs = write(records, tmp_path / "ds.zarr")
    images, masks = np.stack([r.image for r in records]), np.stack([r.mask for r in records])

    def of_shards(arrays: np.ndarray) -> bytes:
        return hashlib.sha256(b"".join(hashlib.sha256(arrays[a:b].tobytes()).digest()
                                       for a, b in ((0, 8), (8, 16), (16, 20)))).digest()

    header = {"format": store.FORMAT, "class_names": CLASSES, "mask_classes": MASK_CLASSES, "image_size": SIZE,
              "num_images": 20}
    expected = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    expected.update(of_shards(images) + of_shards(masks))
    expected.update(np.array([r.label for r in records], dtype="<i8").tobytes())
    data = open_prepared(tmp_path / "ds.zarr")
    for name in ("train", "val", "test", "calib"):
        expected.update(name.encode() + data.split(name).astype("<i8").tobytes())
    assert attrs["content_hash"] == expected.hexdigest() == compute_content_hash(data)


@pytest.mark.parametrize(("image_size", "n", "expected"), [
    (128, 2100, 132),  # the default data set: 16 shards of <= 132 images (8 MiB would hold 170)
    (256, 16000, 42),  # 8 MiB of 256 px images
    (128, 10, 1), (128, 1, 1),
])
def test_shard_length_takes_8_mib_and_at_least_16_shards(image_size: int, n: int, expected: int) -> None:
    assert store.shard_length(image_size, n) == expected
    shards = store.shard_ranges(image_size, n)
    assert [i for shard in shards for i in shard] == list(range(n))


class _FailingSource:
    """A sized, lazy source that fails part-way (after some shards were written)."""

    def __init__(self, records: list[Record], at: int):
        self.records, self.at = records, at

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self):
        for i, rec in enumerate(self.records):
            if i == self.at:
                raise DataError(f"{rec.origin}: boom")
            yield rec


def test_failed_write_leaves_nothing_and_keeps_existing_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store, "SHARD_BYTES", 4 * SIZE * SIZE * 3)  # shards get written before the failure
    monkeypatch.setattr(store, "MIN_SHARDS", 1)
    out = tmp_path / "prepared" / "ds.zarr"
    records = make_records(20)
    with pytest.raises(DataError, match="mem13: boom"):
        write(_FailingSource(records, 13), out)
    assert list((tmp_path / "prepared").iterdir()) == []
    good = write(records, out)["content_hash"]
    bad = list(records)
    bad[5] = Record("r005", records[5].image, np.full((SIZE, SIZE), 7, np.uint8), 0, "file5.png")
    with pytest.raises(DataError, match=r"file5\.png: mask value\(s\) \[7\] outside"):
        write(bad, out)
    assert [p.name for p in (tmp_path / "prepared").iterdir()] == ["ds.zarr"]
    assert open_prepared(out).content_hash == good
    # A new good store replaces the old one.
    assert write(records[:10], out)["num_images"] == 10
    assert open_prepared(out).num_images == 10 and [p.name for p in (tmp_path / "prepared").iterdir()] == ["ds.zarr"]


@pytest.mark.parametrize("record,problem", [
    (Record("x", np.zeros((SIZE, SIZE + 1, 3), np.uint8), np.zeros((SIZE, SIZE), np.uint8), 0, "x.png"), "image is"),
    (Record("x", np.zeros((SIZE, SIZE, 3), np.uint8), np.zeros((SIZE, SIZE - 1), np.uint8), 0, "x.png"), "mismatch"),
    (Record("x", np.zeros((SIZE, SIZE, 3), np.uint8), np.zeros((SIZE, SIZE), np.uint8), 2, "x.png"), "label 2"),
    (Record("r001", np.zeros((SIZE, SIZE, 3), np.uint8), np.zeros((SIZE, SIZE), np.uint8), 0, "x.png"), "duplicate id"),
])
def test_record_validation(tmp_path: Path, record: Record, problem: str) -> None:
    records = make_records(6) + [record]
    with pytest.raises(DataError, match=problem) as err:
        write(records, tmp_path / "ds.zarr")
    assert "x.png" in str(err.value)
    assert not (tmp_path / "ds.zarr").exists() and list(tmp_path.iterdir()) == []


def test_refuses_to_replace_a_non_store(tmp_path: Path) -> None:
    (tmp_path / "ds.zarr").mkdir()
    (tmp_path / "ds.zarr" / "precious.txt").write_text("keep")
    with pytest.raises(DataError, match="not a zarr store; refusing"):
        write(make_records(6), tmp_path / "ds.zarr")
    assert (tmp_path / "ds.zarr" / "precious.txt").read_text() == "keep"


def test_zero_records(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no images"):
        write([], tmp_path / "ds.zarr")
    assert list(tmp_path.iterdir()) == []


def test_split_indices() -> None:
    labels = np.array([0] * 16 + [1] * 4)
    a = split_indices(labels, val=0.2, test=0.2, calib=0.2, seed=5)
    b = split_indices(labels, val=0.2, test=0.2, calib=0.2, seed=5)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    # 4 images in each held-out split, 8 for training; the 4 positives spread one per split.
    assert {k: len(v) for k, v in a.items()} == {"train": 8, "val": 4, "test": 4, "calib": 4}
    assert [labels[a[k]].sum() for k in ("train", "val", "test", "calib")] == [1, 1, 1, 1]
    c = split_indices(labels, val=0.2, test=0.2, calib=0.2, seed=6)
    assert not all(np.array_equal(a[k], c[k]) for k in a)
    with pytest.raises(DataError, match=r"3 image\(s\) are too few.*\['train'\] would be empty"):
        split_indices(np.array([0, 1, 0]), val=0.3, test=0.3, calib=0.3, seed=0)
    with pytest.raises(DataError, match=r"10 image\(s\) are too few.*\['calib'\] would be empty"):
        split_indices(np.array([0, 1] * 5), val=0.2, test=0.2, calib=0.01, seed=0)
    # A class with one member cannot be stratified: still a valid split.
    d = split_indices(np.array([0] * 9 + [1]), val=0.2, test=0.2, calib=0.2, seed=0)
    assert sorted(np.concatenate(list(d.values())).tolist()) == list(range(10))


def test_open_prepared_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"missing\.zarr: prepared data set not found; run `python -m pipeline.prepare`"):
        open_prepared(tmp_path / "missing.zarr")
    (tmp_path / "empty.zarr").mkdir()
    with pytest.raises(DataError, match="empty.zarr: not a readable zarr group"):
        open_prepared(tmp_path / "empty.zarr")
    out = tmp_path / "ds.zarr"
    write(make_records(10), out)
    meta = json.loads((out / "zarr.json").read_text())
    del meta["attributes"]["content_hash"]
    (out / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"missing attributes \['content_hash'\]"):
        open_prepared(out)
    # A store written before the data set declared its positive class: the metrics would have to guess it.
    write(make_records(10), out)
    meta = json.loads((out / "zarr.json").read_text())
    assert meta["attributes"]["positive_class"] == 1 and open_prepared(out).positive_class == 1
    del meta["attributes"]["positive_class"]
    (out / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"missing attributes \['positive_class'\].*re-run `python -m pipeline.prepare`"):
        open_prepared(out)
    with pytest.raises(DataError, match=r"positive class 2 is not an index"):
        write(make_records(10), tmp_path / "bad.zarr", positive_class=2)
    write(make_records(10), out)
    import shutil
    shutil.rmtree(out / "labels")
    with pytest.raises(DataError, match="missing array 'labels'"):
        open_prepared(out)


def test_reader_api_and_load_split(tmp_path: Path) -> None:
    records = make_records(20)
    write(records, tmp_path / "ds.zarr")
    data = open_prepared(tmp_path / "ds.zarr")
    assert isinstance(data, PreparedData)
    assert (data.num_images, data.image_size, data.class_names, data.mask_classes) == (20, SIZE, CLASSES, MASK_CLASSES)
    assert data.content_hash == data.attrs["content_hash"]
    assert data.images.shape[0] == 20 and np.array_equal(data.images[4], records[4].image)
    with pytest.raises(DataError, match="unknown split"):
        data.split("holdout")
    images, masks, labels, idx = load_split(tmp_path / "ds.zarr", "test")
    assert np.array_equal(idx, data.split("test"))
    assert np.array_equal(images, np.stack([records[i].image for i in idx]))
    assert np.array_equal(masks, np.stack([records[i].mask for i in idx]))
    assert labels.dtype == np.int64 and labels.tolist() == [records[i].label for i in idx]
    first2 = load_split(data, "test", limit=2)
    assert np.array_equal(first2[3], idx[:2]) and first2[0].shape == (2, SIZE, SIZE, 3)
    assert load_split(data, "test", limit=0)[0].shape == (0, SIZE, SIZE, 3)


def _read_in_child(data: PreparedData, index: int, queue: mp.Queue) -> None:
    queue.put(np.asarray(data.images[index]).sum().item())


def test_prepared_data_survives_fork_and_pickle(tmp_path: Path) -> None:
    records = make_records(8)
    write(records, tmp_path / "ds.zarr")
    data = open_prepared(tmp_path / "ds.zarr")
    _ = data.images[0]  # the parent holds an open handle before forking
    clone = pickle.loads(pickle.dumps(data))
    assert clone._group is None and np.array_equal(clone.masks[3], records[3].mask)
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_read_in_child, args=(data, 5, queue))
    proc.start()
    got = queue.get(timeout=60)
    proc.join(timeout=60)
    assert proc.exitcode == 0 and got == int(records[5].image.sum())


# ------------------------------------------------------------------------------ integrity
def _sixteen_per_shard(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store, "SHARD_BYTES", 16 * SIZE * SIZE * 3)  # 40 images: shards of 16, 16, 8
    monkeypatch.setattr(store, "MIN_SHARDS", 1)


def test_a_missing_shard_is_a_data_error_naming_the_array_and_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _sixteen_per_shard(monkeypatch)
    out = tmp_path / "ds.zarr"
    write(make_records(40), out)
    (out / "images" / "c" / "1" / "0" / "0" / "0").unlink()
    # What zarr itself does: the lost shard reads as black images, silently.
    assert not zarr.open_group(str(out), mode="r")["images"][16:32].any()
    with pytest.raises(DataError, match=r"ds\.zarr: array 'images' shard 1 \(images 16-31\): file images/c/1/0/0/0 "
                                        r"is missing .*re-run `python -m pipeline\.prepare`"):
        open_prepared(out)


def test_a_corrupt_shard_is_a_data_error_naming_the_array_and_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _sixteen_per_shard(monkeypatch)
    out = tmp_path / "ds.zarr"
    write(make_records(40), out)
    shard = out / "masks" / "c" / "2" / "0" / "0"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 3] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"array 'masks' shard 2 \(images 32-39\): file masks/c/2/0/0 is corrupt"):
        open_prepared(out)
    with pytest.raises(DataError, match="masks/c/2/0/0 is corrupt"):
        load_split(out, "train")  # every reader goes through the check


def test_missing_labels_and_split_chunks_and_metadata_are_named(tmp_path: Path) -> None:
    out = tmp_path / "ds.zarr"
    write(make_records(20), out)
    (out / "labels" / "c" / "0").rename(tmp_path / "labels-chunk")
    # zarr alone: every label becomes 0.
    assert zarr.open_group(str(out), mode="r")["labels"][:].tolist() == [0] * 20
    with pytest.raises(DataError, match=r"array 'labels' chunk 0 \(entries 0-19\): file labels/c/0 is missing"):
        open_prepared(out)
    (tmp_path / "labels-chunk").rename(out / "labels" / "c" / "0")
    open_prepared(out)  # restored: passes
    (out / "splits" / "val" / "c" / "0").unlink()
    with pytest.raises(DataError, match=r"array 'splits/val' chunk 0 \(entries 0-3\): file splits/val/c/0 is missing"):
        open_prepared(out)
    write(make_records(20), out)
    meta = out / "images" / "zarr.json"
    meta.write_text(meta.read_text().replace('"dimension_names"', ' "dimension_names"'))
    with pytest.raises(DataError, match=r"metadata of 'images': file images/zarr.json is corrupt"):
        open_prepared(out)


def test_checksums_cover_every_file_but_the_group_metadata(tmp_path: Path) -> None:
    out = tmp_path / "ds.zarr"
    attrs = write(make_records(20), out)
    import hashlib

    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert sorted(attrs["checksums"]) == [f for f in files if f != "zarr.json"]
    for rel, digest in attrs["checksums"].items():
        assert hashlib.sha256((out / rel).read_bytes()).hexdigest() == digest


def test_a_store_without_checksums_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "ds.zarr"
    write(make_records(10), out)
    meta = json.loads((out / "zarr.json").read_text())
    del meta["attributes"]["checksums"]
    (out / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="has no file checksums .*re-run `python -m pipeline.prepare`"):
        open_prepared(out)
    assert open_prepared(out, verify=False).num_images == 10


def test_take_images_reads_scattered_indices_in_the_order_given(tmp_path: Path) -> None:
    records = make_records(12)
    write(records, tmp_path / "ds.zarr")
    data = open_prepared(tmp_path / "ds.zarr")
    idx = np.array([9, 2, 11, 2, 0])  # unsorted, with a repeat
    images, masks = take_images(data, idx)
    assert np.array_equal(images, np.stack([records[i].image for i in idx]))
    assert np.array_equal(masks, np.stack([records[i].mask for i in idx]))


class _MisdeclaredSource:
    """A sized source whose length is not the number of records it yields."""

    def __init__(self, records: list[Record], declared: int):
        self.records, self.declared = records, declared

    def __len__(self) -> int:
        return self.declared

    def __iter__(self):
        return iter(self.records)


@pytest.mark.parametrize(("yielded", "declared", "message"), [
    (21, 20, "yielded more records than its declared length 20"),
    (19, 20, "yielded 19 records, expected 20"),
])
def test_a_source_that_miscounts_its_records_is_a_data_error(tmp_path: Path, yielded: int, declared: int,
                                                             message: str) -> None:
    with pytest.raises(DataError, match=message):
        write(_MisdeclaredSource(make_records(yielded), declared), tmp_path / "prepared" / "ds.zarr")
    assert list((tmp_path / "prepared").iterdir()) == []


def test_a_store_is_checked_file_by_file_once_per_process_while_its_files_stay_the_same(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "ds.zarr"
    write(make_records(12), out)
    open_prepared(out)
    reads: list[str] = []
    real = store.PreparedData._read_file
    monkeypatch.setattr(store.PreparedData, "_read_file", lambda self, rel: reads.append(rel) or real(self, rel))
    open_prepared(out)
    assert reads == []  # the same files as at the first open: not read again
    shard = out / "masks" / "c" / "0" / "0" / "0"
    shard.write_bytes(shard.read_bytes())  # rewritten: same bytes, a new modification time
    open_prepared(out)
    assert "masks/c/0/0/0" in reads and len(reads) == len(open_prepared(out, verify=False).attrs["checksums"])
