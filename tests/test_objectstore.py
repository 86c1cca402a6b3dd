"""``data.root`` as an object-storage URI: what is accepted, and where each path of a stage goes."""

from __future__ import annotations

from pathlib import Path

import pytest

from uml import objectstore
from uml.config import Paths, parse_params
from uml.errors import ConfigError

URI = "s3://bkt/runs/uml?endpoint_override=127.0.0.1:9000&scheme=http&region=eu-west-1"


def test_join_appends_to_the_path_and_keeps_the_options() -> None:
    assert objectstore.join(URI, "prepared", "dataset.zarr") == \
        "s3://bkt/runs/uml/prepared/dataset.zarr?endpoint_override=127.0.0.1:9000&scheme=http&region=eu-west-1"
    assert objectstore.join("s3://bkt/x/", "ray") == "s3://bkt/x/ray"


def test_the_uri_options_become_s3fs_options() -> None:
    assert objectstore.bucket_path(URI) == "bkt/runs/uml"
    assert objectstore.without_options(URI) == "s3://bkt/runs/uml"
    assert objectstore.fsspec_options(URI) == {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000",
                                                                 "region_name": "eu-west-1"}}
    # pyarrow's default scheme is https; no options, none for s3fs.
    assert objectstore.fsspec_options("s3://b/x?endpoint_override=minio:9000") == \
        {"client_kwargs": {"endpoint_url": "https://minio:9000"}}
    assert objectstore.fsspec_options("s3://b/x") == {}
    assert objectstore.describe(URI) == "s3://bkt/runs/uml (endpoint http://127.0.0.1:9000)"


@pytest.mark.parametrize(("root", "message"), [
    ("gs://bkt/uml", r"scheme 'gs'; object storage here is s3://"),
    ("s3:///uml", r"names no bucket"),
    ("s3://bkt/uml?endpoint=x", r"options \['endpoint'\]; the ones understood are \['endpoint_override', 'scheme', 'region'\]"),
])
def test_a_uri_data_root_that_cannot_work_is_refused_naming_the_key(root: str, message: str) -> None:
    with pytest.raises(ConfigError, match=rf"data\.root: .*{message}"):
        parse_params({"data": {"root": root}}, source="p.yaml")


def test_local_root_must_be_a_folder() -> None:
    with pytest.raises(ConfigError, match=r"data\.local_root: .*must be a local folder, got the URI 's3://bkt/x'"):
        parse_params({"data": {"root": URI, "local_root": "s3://bkt/x"}}, source="p.yaml")


def test_with_a_uri_root_the_store_and_ray_storage_are_in_the_bucket_and_the_rest_is_local(tmp_path: Path) -> None:
    params = parse_params({"data": {"root": URI, "local_root": str(tmp_path / "local")}}, source="p.yaml").resolved()
    paths = Paths(params)
    assert paths.root_uri == URI
    assert paths.shared_dataset == objectstore.join(URI, "prepared", "dataset.zarr")
    assert paths.storage == paths.ray_storage_uri == objectstore.join(URI, "ray")
    # DVC's outputs stay local: the store's copy that DVC versions, models and reports.
    assert paths.dataset == tmp_path / "local" / "prepared" / "dataset.zarr"
    assert paths.model_onnx == tmp_path / "local" / "models" / "model.onnx"
    assert paths.metrics == tmp_path / "local" / "reports" / "metrics.json"
    # An explicit ray.storage_path still decides where Ray's runs go.
    own = parse_params({"data": {"root": URI}, "ray": {"storage_path": str(tmp_path / "runs")}}, source="p.yaml")
    assert Paths(own.resolved()).storage == str(tmp_path / "runs")


def test_with_a_folder_root_nothing_changes(tmp_path: Path) -> None:
    paths = Paths(parse_params({"data": {"root": str(tmp_path / "d"), "local_root": "elsewhere"}}, source="p.yaml"))
    assert paths.root_uri is None and paths.ray_storage_uri is None
    assert paths.shared_dataset == str(tmp_path / "d" / "prepared" / "dataset.zarr")
    assert paths.storage == str(tmp_path / "d" / "ray")
