"""The driver's checks that need no cluster: GPU shares, whether the workers fit on the nodes (as
ray.nodes() lists them), and relative paths inside a `ray job submit`. The same checks against a
real two-node cluster are in tests/train/test_cluster.py."""

import json

import pytest
from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

from uml.config import Params, Paths, load_params, parse_params
from uml.errors import ClusterError, ConfigError
from uml.stage import RAY_JOB_CONFIG_ENV, check_job_paths, submitted_job_id
from uml.train.preflight import bundle, check_gpu_request, check_resources_fit, scaling_config


def _node(alive=True, **resources):
    return {"Alive": alive, "NodeID": "n" * 56, "NodeManagerAddress": "10.0.0.1", "Resources": resources}


@pytest.mark.parametrize(("gpus", "workers"), [(0.5, 2), (0.25, 4), (0.99, 2)])
def test_a_fraction_of_a_gpu_per_rank_with_several_ranks_is_refused(gpus, workers):
    with pytest.raises(ClusterError, match="Duplicate GPU detected") as err:
        check_gpu_request(True, gpus, workers)
    assert f"GPU is {gpus:g} with {workers} workers" in str(err.value)


def test_gpu_shares_nccl_can_run_pass():
    check_gpu_request(True, 0.5, 1)  # one rank: nothing to collide with
    check_gpu_request(True, 1, 8)
    check_gpu_request(True, 2, 4)
    check_gpu_request(False, 0, 4)
    with pytest.raises(ClusterError, match="whole number"):
        check_gpu_request(True, 1.5, 2)


def test_the_bundle_is_what_ray_reserves_per_worker():
    params = Params().with_overrides({"ray.use_gpu": True, "ray.resources_per_worker": {"CPU": 8, "node_slot": 1}})
    assert bundle(scaling_config(params, 2)) == {"CPU": 8.0, "GPU": 1.0, "node_slot": 1.0}
    params = params.with_overrides({"ray.resources_per_worker": {"CPU": 4, "GPU": 2}})
    assert bundle(scaling_config(params, 2)) == {"CPU": 4.0, "GPU": 2.0}
    assert bundle(scaling_config(Params())) == {"CPU": 1.0}


def test_a_worker_larger_than_every_node_is_refused():
    nodes = [_node(CPU=16.0, GPU=8.0), _node(CPU=64.0), _node(alive=False, CPU=128.0, GPU=8.0)]
    check_resources_fit({"CPU": 2.0, "GPU": 1.0}, 8, nodes)  # 8 workers on the first node
    with pytest.raises(ClusterError, match="no alive node") as err:
        check_resources_fit({"CPU": 32.0, "GPU": 1.0}, 1, nodes)  # the dead node would have had room
    assert "{CPU: 32, GPU: 1}" in str(err.value) and "{CPU: 64, GPU: 8}" in str(err.value)
    with pytest.raises(ClusterError, match="no alive node"):
        check_resources_fit({"CPU": 1.0, "node_slot": 1.0}, 1, nodes)  # a custom resource no node has


def test_more_workers_than_the_cluster_holds_are_refused():
    # 3 + 1 workers of 5 CPUs fit on nodes of 16 and 7 CPUs (whole workers per node, not 23 / 5).
    nodes = [_node(CPU=16.0), _node(CPU=7.0)]
    check_resources_fit({"CPU": 5.0}, 4, nodes)
    with pytest.raises(ClusterError, match="5 training workers") as err:
        check_resources_fit({"CPU": 5.0}, 5, nodes)
    assert "hold 4 (per node: [3, 1])" in str(err.value)
    # One GPU per worker, 2 GPUs on each of 2 nodes.
    gpu_nodes = [_node(CPU=32.0, GPU=2.0), _node(CPU=32.0, GPU=2.0)]
    check_resources_fit({"CPU": 8.0, "GPU": 1.0}, 4, gpu_nodes)
    with pytest.raises(ClusterError, match="do not fit"):
        check_resources_fit({"CPU": 8.0, "GPU": 1.0}, 5, gpu_nodes)


def _job_env(submission_id="raysubmit_abc"):
    # The variable as Ray's job supervisor writes it for the entrypoint (job_supervisor.py).
    return {RAY_JOB_CONFIG_JSON_ENV_VAR: json.dumps({"runtime_env": {}, "metadata": {
        "job_submission_id": submission_id, "job_name": submission_id}})}


def test_the_job_variable_is_rays():
    assert RAY_JOB_CONFIG_ENV == RAY_JOB_CONFIG_JSON_ENV_VAR
    assert submitted_job_id(_job_env()) == "raysubmit_abc"
    assert submitted_job_id({}) is None


def test_relative_paths_are_refused_inside_a_ray_job(tmp_path):
    params = parse_params({"data": {"root": "data"}}, source="configs/paper-gpu.yaml")
    check_job_paths(params, environ={})  # not a job: a relative root is fine
    with pytest.raises(ConfigError) as err:
        check_job_paths(params, environ=_job_env())
    message = str(err.value)
    assert message.startswith("configs/paper-gpu.yaml: data.root 'data' is relative")
    assert "raysubmit_abc" in message and "absolute path on storage every node mounts" in message
    storage = parse_params({"data": {"root": str(tmp_path)}, "ray": {"storage_path": "runs"}})
    with pytest.raises(ConfigError, match="ray.storage_path 'runs' is relative"):
        check_job_paths(storage, environ=_job_env())
    both = parse_params({"ray": {"storage_path": "runs"}})
    with pytest.raises(ConfigError, match="data.root 'data', ray.storage_path 'runs' are relative"):
        check_job_paths(both, environ=_job_env())
    # Absolute paths, a home-relative path and object storage are accepted.
    for ok in ({"data": {"root": str(tmp_path)}},
               {"data": {"root": "~/uml-data"}, "ray": {"storage_path": "s3://bucket/uml"}},
               {"data": {"root": str(tmp_path)}, "ray": {"storage_path": str(tmp_path / "ray")}},
               {"data": {"root": "s3://bucket/uml", "local_root": str(tmp_path)}}):
        check_job_paths(parse_params(ok), environ=_job_env())
    # With data.root in a bucket, the stages' own files go to data.local_root: the job's copy would lose them.
    bucket = parse_params({"data": {"root": "s3://bucket/uml"}})
    with pytest.raises(ConfigError, match="data.local_root 'data' is relative"):
        check_job_paths(bucket, environ=_job_env())


@pytest.mark.parametrize("uri", ["gs://bucket/uml", "file:///mnt/uml"])
def test_a_uri_data_root_other_than_s3_is_refused_instead_of_becoming_a_local_folder(uri, tmp_path, monkeypatch):
    # Before: Path("gs://bucket/uml").resolve() was <cwd>/gs:/bucket/uml, written to silently.
    monkeypatch.chdir(tmp_path)
    params_file = tmp_path / "params.yaml"
    params_file.write_text(f"data:\n  root: {uri}\n")
    with pytest.raises(ConfigError) as err:
        load_params(params_file)
    message = str(err.value)
    assert message.startswith(f"{params_file}: data.root: ") and repr(uri) in message
    assert "object storage here is s3://" in message
    assert not any(tmp_path.rglob("*bucket*")) and not (tmp_path / "file:").exists()
    # Object storage stays possible for Ray's checkpoints.
    params = parse_params({"data": {"root": str(tmp_path)}, "ray": {"storage_path": uri}})
    assert Paths(params).storage == uri and Paths(params).ray_storage_uri == uri


def test_an_s3_data_root_becomes_no_local_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = parse_params({"data": {"root": "s3://bucket/uml"}}).resolved()
    assert params.data.root == "s3://bucket/uml"
    assert Paths(params).dataset == tmp_path / "data" / "prepared" / "dataset.zarr"  # data.local_root
    assert not any(tmp_path.rglob("*bucket*")) and not (tmp_path / "s3:").exists()


def test_the_node_probe_reports_a_missing_store_another_copy_and_a_storage_it_cannot_use(tmp_path):
    import hashlib

    from uml.train.preflight import _probe_node

    store = tmp_path / "dataset.zarr"
    store.mkdir()
    (store / "zarr.json").write_text('{"attributes": {"content_hash": "abc"}}')
    digest = hashlib.sha256(b'{"attributes": {"content_hash": "abc"}}').hexdigest()
    marker = tmp_path / "ray" / ".uml-preflight" / "m1"
    marker.parent.mkdir(parents=True)
    marker.write_text("driver 1234")
    assert _probe_node(str(store), digest, str(marker), "driver 1234", "node7") == []
    assert (marker.parent / "m1.node7").read_text() == "node7"  # the node's reply the driver looks for
    # Another copy of the store (a different zarr.json: other content hash or checksums).
    other = hashlib.sha256(b"something else").hexdigest()
    assert _probe_node(str(store), other, None, None, "n") == [
        f"the prepared store {store} (data.root) there is a different copy than the driver's"]
    assert _probe_node(str(tmp_path / "missing.zarr"), digest, None, None, "n") == [
        f"the prepared store {tmp_path / 'missing.zarr'} (data.root) does not exist there"]
    # The driver's marker with other content (another driver's folder at the same path).
    assert _probe_node(str(store), digest, str(marker), "driver 9999", "n") == [
        f"a file the driver wrote into ray.storage_path ({tmp_path / 'ray'}) is not visible there"]


def test_dvc_repro_inside_a_ray_job_is_refused(tmp_path):
    # DVC names the stage in each stage command's environment (dvc.env.DVC_STAGE); inside a job,
    # dvc.lock and the tracked outputs would vanish with the job's temporary working dir.
    from dvc.env import DVC_STAGE

    from uml.stage import DVC_STAGE_ENV

    assert DVC_STAGE_ENV == DVC_STAGE
    params = parse_params({"data": {"root": str(tmp_path)}})
    check_job_paths(params, environ={DVC_STAGE: "train"})  # dvc repro outside a job: fine
    with pytest.raises(ConfigError) as err:
        check_job_paths(params, environ={**_job_env(), DVC_STAGE: "train"})
    message = str(err.value)
    assert message.startswith("stage 'train' of dvc repro runs inside the Ray job raysubmit_abc")
    assert "RAY_ADDRESS=<head>:6379 RAY_AUTH_MODE=token dvc repro" in message
