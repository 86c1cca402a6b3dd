"""The prepared store on object storage (a real S3 server on loopback): the copy prepare
publishes, read back through zarr and s3fs as the nodes read it."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from tests.data.helpers import params_for
from tests.s3 import s3_server
from uml.config import Paths
from uml.data.prepare import prepare
from uml.data.store import compute_content_hash, open_prepared, publish_store, shared_copy
from uml.errors import DataError

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture
def s3(monkeypatch):
    with s3_server(monkeypatch, "data-bucket") as server:
        yield server


def _prepared(tmp_path: Path, s3, seed: int = 0):
    params = params_for(tmp_path, root=s3.uri("uml"), local_root=str(tmp_path / "local"), seed=seed,
                        synthetic={"num_images": 24, "render_size": 64}).resolved()
    prepare(params)
    return params, Paths(params)


def test_prepare_publishes_the_store_and_a_node_reads_the_same_images(tmp_path: Path, s3, caplog) -> None:
    with caplog.at_level(logging.INFO):
        params, paths = _prepared(tmp_path, s3)
    local_files = sorted(p.relative_to(paths.dataset).as_posix() for p in paths.dataset.rglob("*") if p.is_file())
    assert s3.keys("uml/prepared/dataset.zarr") == [f"data-bucket/uml/prepared/dataset.zarr/{rel}" for rel in local_files]
    assert "copied the prepared store on object storage: s3://data-bucket/uml/prepared/dataset.zarr" in caplog.text

    remote, local = open_prepared(paths.shared_dataset), open_prepared(paths.dataset)
    # Recomputed from the pixels read out of the bucket: the hash the local store recorded.
    assert compute_content_hash(remote) == local.content_hash
    assert np.array_equal(np.asarray(remote.images[:]), np.asarray(local.images[:]))
    assert np.array_equal(remote.split("test"), local.split("test"))


def test_an_unchanged_store_is_not_copied_again_and_a_changed_one_replaces_the_old_copy(tmp_path: Path, s3) -> None:
    params, paths = _prepared(tmp_path, s3)
    assert publish_store(paths.dataset, paths.shared_dataset) is False
    first = open_prepared(paths.shared_dataset).content_hash

    _, paths = _prepared(tmp_path, s3, seed=1)  # other images
    second = open_prepared(paths.shared_dataset)
    assert second.content_hash == open_prepared(paths.dataset).content_hash != first
    assert compute_content_hash(second) == second.content_hash


def test_a_lost_object_is_named_and_a_copy_cut_short_is_not_a_store(tmp_path: Path, s3) -> None:
    params, paths = _prepared(tmp_path, s3)
    s3.fs.delete_file("data-bucket/uml/prepared/dataset.zarr/images/c/0/0/0/0")
    with pytest.raises(DataError, match=r"s3://data-bucket/uml/prepared/dataset\.zarr \(endpoint http://127\.0\.0\.1:\d+\): "
                                        r"array 'images' shard 0 \(images 0-\d+\): file images/c/0/0/0/0 is missing"):
        open_prepared(paths.shared_dataset)
    # The stages that hand the store to other processes copy it again first.
    assert shared_copy(paths.dataset, paths.shared_dataset) == paths.shared_dataset
    open_prepared(paths.shared_dataset)

    # An interrupted copy: the group's metadata is removed first and written last.
    s3.fs.delete_file("data-bucket/uml/prepared/dataset.zarr/zarr.json")
    with pytest.raises(DataError, match=r"prepared data set not found \(prepare writes it there when data\.root is this "
                                        r"bucket\); run `python -m pipeline\.prepare` first"):
        open_prepared(paths.shared_dataset)


def test_the_training_dataset_reads_the_bucket_copy_item_for_item(tmp_path: Path, s3) -> None:
    from uml.data.dataset import SegClsDataset

    params, paths = _prepared(tmp_path, s3)
    train = open_prepared(paths.dataset).split("train")
    remote, local = SegClsDataset(paths.shared_dataset, train), SegClsDataset(paths.dataset, train)
    assert remote.store_path == paths.shared_dataset  # the URI as given, not a mangled local path
    for i in (0, len(train) - 1):
        got, want = remote[i], local[i]
        assert np.array_equal(got["image"], want["image"]) and np.array_equal(got["mask"], want["mask"])
        assert got["label"] == want["label"]
