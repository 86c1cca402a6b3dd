"""A real two-node Ray cluster on this machine, set up with the commands of
docs/how-to/ray-cluster.md: a token made with ``ray get-auth-token --generate``, a head started with
``RAY_AUTH_MODE=token ray start --head``, a second node joining with ``ray start --address`` and
the token in ``RAY_AUTH_TOKEN``, ``ray job submit`` of the stages, and ``dvc repro`` with
``RAY_ADDRESS``.

The nodes use the loopback addresses 127.0.0.2 (head) and 127.0.0.3: Ray rewrites 127.0.0.1 to
the machine's LAN address unless it runs in single-node mode, which refuses a second node.
Traffic between the nodes stays on loopback, but in multi-node mode Ray's GCS and raylets listen
on every interface (Ray 2.60 binds them to the wildcard address), so the cluster requires its own
random token for the few seconds it runs. Each node has one ``uml_slot``, a custom resource a
training worker asks for, which places one worker per node.

One cluster serves the module; it is stopped by the process ids of its own processes (those whose
command line names its temp folder, and their children), never ``ray stop``, which stops every
Ray instance on the machine.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml

from uml.config import Paths, load_params, parse_params
from uml.data.prepare import prepare
from uml.data.store import compute_content_hash, open_prepared

from tests.s3 import CREDENTIALS as S3_CREDENTIALS
from tests.s3 import s3_server
from tests.train.cluster_checks import LACKS_ENV
from tests.train.test_job_submit import AGENT_NOT_READY, SUBMIT_TRIES, _stop
from tests.train.tiny import write_tiny_params

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))
CHECKS = Path(__file__).with_name("cluster_checks.py")
HEAD_IP, WORKER_IP = "127.0.0.2", "127.0.0.3"
# One training worker per node: each node offers one, each worker asks for one.
SLOT = {"CPU": 1, "uml_slot": 1}


def _cluster_processes(base: Path) -> set[int]:
    """The processes of the test cluster: those whose command line names its folder, and their children."""
    found = set()
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(str(base) in part for part in proc.info["cmdline"] or ()):
                found.add(proc.pid)
                found.update(child.pid for child in proc.children(recursive=True))
        except psutil.Error:
            continue
    return found


def _run(args: list[str], env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)


class Cluster:
    def __init__(self, base: Path, gcs: str, dashboard: str, env: dict[str, str]):
        self.base, self.gcs, self.dashboard, self.env = base, gcs, dashboard, env

    def checks(self, mode: str, *params: Path, env: dict[str, str] | None = None) -> dict:
        """cluster_checks.py as a driver of its own (authenticated by the head's token file);
        ``env``: variables of the driver's own, which the nodes were not started with."""
        out = _run([sys.executable, str(CHECKS), self.gcs, mode, *map(str, params)],
                   env={**self.env, "PYTHONPATH": str(REPO), **(env or {})}, timeout=300)
        assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    def submit(self, params: Path, stage: str = "train") -> subprocess.CompletedProcess:
        """The job submission of docs/how-to/ray-cluster.md, with this cluster's dashboard address (and this venv's python)."""
        for _ in range(SUBMIT_TRIES):  # repeated only while the head's agent is not registered yet
            job = _run([RAY, "job", "submit", "--address", self.dashboard, "--working-dir", str(REPO), "--",
                        sys.executable, "-m", f"pipeline.{stage}", "--params", str(params)], env=self.env, timeout=600)
            if job.returncode == 0 or AGENT_NOT_READY not in job.stdout + job.stderr:
                return job
            time.sleep(1)
        return job


@pytest.fixture(scope="module")
def cluster():
    # A short path: Ray's unix sockets live under it and AF_UNIX paths are limited to ~107 bytes.
    base = Path(tempfile.mkdtemp(prefix="umlc", dir="/tmp"))
    head_home, worker_home = base / "head-home", base / "worker-home"
    head_home.mkdir()
    worker_home.mkdir()
    env = {key: value for key, value in os.environ.items()
           if key not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE")}
    # The head's user: its own home, so `ray get-auth-token --generate` writes a fresh
    # ~/.ray/auth_token (not this machine's). gloo binds the loopback interface.
    env.update(HOME=str(head_home), RAY_AUTH_MODE="token", GLOO_SOCKET_IFNAME="lo",
               MPLCONFIGDIR=str(base / "matplotlib"), NO_ALBUMENTATIONS_UPDATE="1")
    # The nodes' credentials for the loopback S3 server of the object-storage DAG (moto accepts
    # any), as an operator gives a cluster's nodes theirs (instance role, environment).
    env.update(S3_CREDENTIALS)
    try:
        made = _run([RAY, "get-auth-token", "--generate"], env=env)
        assert made.returncode == 0, made.stderr[-2000:]
        token = (head_home / ".ray" / "auth_token").read_text().strip()
        assert token and made.stdout.strip() == token
        head = _run([RAY, "start", "--head", f"--node-ip-address={HEAD_IP}", "--port=0", f"--dashboard-host={HEAD_IP}",
                     "--dashboard-port=0", "--dashboard-agent-listen-port=0",
                     "--num-cpus=2", f"--resources={json.dumps({'uml_slot': 1})}", f"--temp-dir={base / 'ray'}",
                     "--disable-usage-stats"], env=env)
        log = head.stdout + head.stderr
        assert head.returncode == 0, log[-3000:]
        gcs = re.search(rf"ray start --address='({re.escape(HEAD_IP)}:\d+)'", log)
        dashboard = re.search(rf"http://{re.escape(HEAD_IP)}:\d+", log)
        assert gcs and dashboard, log[-3000:]
        # A node joins with the token alone (its user has no token file), and lacks one folder
        # (simulated, see cluster_checks.py). Its own temp folder, as on a machine of its own: a
        # node otherwise takes the head's, and the two would delete each other's unpacked job
        # working dirs.
        worker_env = {**env, "HOME": str(worker_home), "RAY_AUTH_TOKEN": token, LACKS_ENV: str(base / "node-local")}
        worker = _run([RAY, "start", f"--address={gcs.group(1)}", f"--node-ip-address={WORKER_IP}", "--num-cpus=1",
                       f"--resources={json.dumps({'uml_slot': 1})}", "--dashboard-agent-listen-port=0",
                       f"--temp-dir={base / 'ray-node2'}", "--disable-usage-stats"], env=worker_env)
        assert worker.returncode == 0, (worker.stdout + worker.stderr)[-3000:]
        yield Cluster(base, gcs.group(1), dashboard.group(0), env)
    finally:
        _stop(_cluster_processes(base))
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def shared_data(cluster):
    """Tiny params whose data.root is a folder both nodes see, prepared once."""
    root = cluster.base / "shared"
    root.mkdir()
    path = write_tiny_params(root, train={"epochs": 1, "use_tuned": False},
                             ray={"num_workers": 2, "resources_per_worker": SLOT, "max_failures": 0})
    prepare(load_params(path))
    return path


def _variant(shared_params: Path, name: str, **sections) -> Path:
    raw = yaml.safe_load(shared_params.read_text())
    for section, values in sections.items():
        raw[section].update(values)
    path = shared_params.with_name(f"{name}.yaml")
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_job_submit_with_a_relative_data_root_stops_before_anything_runs(cluster, shared_data):
    relative = _variant(shared_data, "relative", data={"root": "data"})
    job = cluster.submit(relative)
    log = job.stdout + job.stderr
    assert job.returncode != 0
    assert f"train: error: {relative}: data.root 'data' is relative" in log
    assert "absolute path on storage every node mounts" in log
    assert "joining Ray cluster" not in log  # refused before the stage did anything


def test_the_store_and_storage_check_accepts_shared_folders_and_refuses_a_node_local_one(cluster, shared_data):
    node_local = cluster.base / "node-local"  # the worker node lacks this folder (simulated)
    store = Paths(load_params(shared_data)).dataset
    shutil.copytree(store, node_local / "data" / "prepared" / "dataset.zarr")
    local_data = _variant(shared_data, "local-data", data={"root": str(node_local / "data")},
                          ray={"storage_path": str(cluster.base / "shared" / "data" / "ray")})
    local_storage = _variant(shared_data, "local-storage", ray={"storage_path": str(node_local / "ray")})
    results = cluster.checks("paths", shared_data, local_data, local_storage)
    assert results["nodes"] == [HEAD_IP, WORKER_IP]
    assert results[str(shared_data)] == "ok"
    refused = results[str(local_data)]
    assert f"node {WORKER_IP} (" in refused and f"node {HEAD_IP} (" not in refused
    assert f"the prepared store {node_local}/data/prepared/dataset.zarr (data.root) does not exist there" in refused
    refused = results[str(local_storage)]
    assert f"node {WORKER_IP} (" in refused and f"node {HEAD_IP} (" not in refused
    assert f"a file the driver wrote into ray.storage_path ({node_local}/ray) is not visible there" in refused
    # The check cleans up after itself.
    assert not list((cluster.base / "shared" / "data" / "ray").glob(".uml-preflight/*"))


def test_train_and_tune_drivers_refuse_what_the_cluster_cannot_place(cluster, shared_data):
    too_big = _variant(shared_data, "too-big", ray={"resources_per_worker": {"CPU": 64}})
    too_many = _variant(shared_data, "too-many", ray={"num_workers": 3}, tune={"workers_per_trial": 3})
    half_gpus = _variant(shared_data, "half-gpus", ray={"use_gpu": True, "resources_per_worker": {"CPU": 1, "GPU": 0.5}},
                         tune={"workers_per_trial": 2})
    results = cluster.checks("stages", too_big, too_many, half_gpus)
    for stage in ("train", "sweep"):
        big = results[f"{too_big}:{stage}"]
        assert "no alive node of the 2 has that much" in big["error"] and "{CPU: 64}" in big["error"]
        assert "CPU: 2" in big["error"]  # the largest node, the head
        many = results[f"{too_many}:{stage}"]
        assert "3 training workers of {CPU: 1, uml_slot: 1} each do not fit" in many["error"]
        assert "hold 2 (per node: [1, 1])" in many["error"]
        assert "Duplicate GPU detected" in results[f"{half_gpus}:{stage}"]["error"]
        # Refused at once instead of waiting for a placement that never comes.
        assert max(results[f"{p}:{stage}"]["seconds"] for p in (too_big, too_many, half_gpus)) < 60


def test_a_local_run_beside_another_ray_instance_finds_its_own(cluster, shared_data):
    """Issue 15 item 7: Ray components that look the cluster up without an address (the state
    API, which Ray Train's placement-group cleaner calls in a worker process) found two instances
    and failed with "Found multiple active Ray instances". A stage's local instance pins its own
    address for its driver and workers."""
    env = {key: value for key, value in os.environ.items() if key not in ("RAY_ADDRESS",)}
    out = _run([sys.executable, str(CHECKS), "-", "beside", str(shared_data)], env={**env, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    results = json.loads(out.stdout.strip().splitlines()[-1])
    assert results == {"driver": ["127.0.0.1"], "worker": ["127.0.0.1"]}, results


def test_the_workers_get_the_drivers_nccl_settings_the_collective_timeout_and_no_cudnn_change_on_cpus(cluster, shared_data):
    """Issue 25: what a training worker on each node of a joined cluster sees. The NCCL_*
    variables exist only in the driver's environment (the nodes were started without them), so
    they reach the workers through the session's runtime environment or not at all."""
    assert not any(key.startswith("NCCL_UML") for key in cluster.env)
    params = _variant(shared_data, "settings", ray={"collective_timeout_s": 321}, train={"cudnn_benchmark": True})
    seen = cluster.checks("settings", params, env={"NCCL_UML_TEST": "from the driver", "NCCL_DEBUG": "WARN"})
    assert sorted(s["node"] for s in seen.values()) == [HEAD_IP, WORKER_IP]  # one worker per node
    for rank, worker in seen.items():
        assert worker["nccl"].get("NCCL_UML_TEST") == "from the driver" and worker["nccl"].get("NCCL_DEBUG") == "WARN", rank
        assert worker["timeout_s"] == 321.0, rank  # Ray's default would be 1800
        # On a CPU, train.cudnn_benchmark leaves torch's flag alone (off): CPU training is unchanged.
        assert (worker["device"], worker["cudnn_benchmark"], worker["world"]) == ("cpu", False, 2), rank


def test_prepare_runs_as_a_ray_job_on_the_cluster(cluster, shared_data):
    """prepare submitted as docs/how-to/ray-cluster.md shows writes the store into a folder both
    nodes see. (The sweep's trials on the cluster, and the record of what they were tuned for, are
    checked by the DAG on the cluster below, whose tune stage joins it the way a job's driver does.)"""
    root = cluster.base / "shared-jobs" / "data"
    params_path = _variant(shared_data, "jobs", data={"root": str(root)})
    job = cluster.submit(params_path, stage="prepare")
    assert job.returncode == 0, (job.stdout + job.stderr)[-5000:]
    params = load_params(params_path)
    # The same data params as the store this module prepared in-process, in another folder: the
    # job's store has the same content hash, which is recomputed from its pixels.
    reference = open_prepared(Paths(load_params(shared_data)).dataset)
    store = open_prepared(Paths(params).dataset)
    assert store.content_hash == reference.content_hash == compute_content_hash(Paths(params).dataset)


def test_evaluate_sharded_over_both_nodes_writes_the_single_process_metrics(cluster, tmp_path_factory):
    """evaluate submitted as a Ray job with evaluate.workers=3: the passes' shards run as tasks on
    both nodes of the cluster, and metrics.json is byte for byte the one of evaluate in one
    process (the exported toy model of tests/toy_onnx.py on a store in the shared folder)."""
    from tests.toy_onnx import export_toy, imperfect_set, write_toy_root
    from uml.evaluate import evaluate

    toy_dir = export_toy(tmp_path_factory.mktemp("toy") / "models").parent
    root = write_toy_root(cluster.base / "shared-eval", toy_dir, imperfect_set(40))
    settings = {"batch_size": 4, "gaussian_sigmas": [0.1], "salt_pepper_amounts": [0.05], "num_panels": 2,
                "bootstrap_samples": 200}
    single = parse_params({"data": {"root": str(root)}, "evaluate": settings})
    evaluate(single)
    metrics_path = Paths(single).metrics
    reference = metrics_path.read_text()
    metrics_path.unlink()

    params_path = cluster.base / "shared-eval" / "sharded.yaml"
    params_path.write_text(yaml.safe_dump({"data": {"root": str(root)}, "evaluate": {**settings, "workers": 3}}))
    job = cluster.submit(params_path, stage="evaluate")
    log = job.stdout + job.stderr
    assert job.returncode == 0, log[-5000:]
    assert "joining Ray cluster" in log, log[-3000:]
    # 20 test images in batches of 4: shards 0:8, 8:16, 16:20 of each of 3 passes.
    assert "evaluating 3 passes as 9 Ray tasks" in log and "ran on 2 Ray node(s)" in log, log[-3000:]
    assert metrics_path.read_text() == reference


def test_predict_sharded_over_both_nodes_writes_the_single_process_outputs(cluster, tmp_path_factory):
    """``uml predict --workers 4`` with RAY_ADDRESS set joins the cluster; the shards run as tasks
    on both nodes and every output file is the one-process run's (toy model and images in the
    shared folder)."""
    from PIL import Image

    from tests.toy_onnx import draw_fundus, export_toy

    shared = cluster.base / "shared-predict"
    model = export_toy(shared / "models")
    images = []
    for i, ratio in enumerate(np.linspace(0.2, 0.8, 8)):
        images.append(shared / "photos" / f"eye{i}.png")
        images[-1].parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(draw_fundus(128, 40, float(ratio))[0]).save(images[-1])
    command = [sys.executable, "-m", "uml.cli", "predict", *map(str, images), "--model", str(model)]
    env = {**cluster.env, "PYTHONPATH": str(REPO)}
    one = _run([*command, "--out", str(shared / "one")], env=env, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    sharded = _run([*command, "--out", str(shared / "ray"), "--workers", "4"], env={**env, "RAY_ADDRESS": cluster.gcs},
                   timeout=300)
    assert sharded.returncode == 0, (sharded.stdout + sharded.stderr)[-5000:]
    assert "predicting 8 images as 4 Ray tasks of at most 2 images each" in sharded.stdout
    assert "the 4 tasks ran on 2 Ray node(s)" in sharded.stdout, sharded.stdout[-3000:]
    written = sorted(p.name for p in (shared / "one").iterdir())
    assert len(written) == 16 and written == sorted(p.name for p in (shared / "ray").iterdir())
    for name in written:
        assert (shared / "ray" / name).read_bytes() == (shared / "one" / name).read_bytes(), name


def test_dvc_repro_with_ray_address_and_data_root_on_s3_runs_the_stages_on_the_cluster(cluster, monkeypatch):
    """The how-to's `RAY_ADDRESS=... RAY_AUTH_MODE=token dvc repro` on a cluster whose data lives
    on object storage: the miniature DAG (tests/dag/miniature.py, 2 training epochs) with
    ``data.root`` on a real S3 server on loopback. Every Ray stage joins the two-node cluster
    instead of starting a local instance; prepare writes the store to the bucket, and the training
    workers (DDP, one per node), the sweep's trials and evaluate's tasks, sharded over both nodes,
    read it from there; Ray's runs are in the bucket too. The stages' own files stay in the
    checkout's data/, where DVC's record is complete afterwards."""
    from tests.dag.miniature import run_miniature_dag

    with s3_server(monkeypatch, "uml-dag") as s3:
        root = s3.uri("uml")
        env = {"RAY_ADDRESS": cluster.gcs, "RAY_AUTH_MODE": "token", "HOME": cluster.env["HOME"],
               "GLOO_SOCKET_IFNAME": "lo", "MPLCONFIGDIR": cluster.env["MPLCONFIGDIR"], **S3_CREDENTIALS}
        dag = run_miniature_dag(cluster.base / "dag", env_vars=env, overrides=(
            f"data.root={root}", "train.epochs=2", "train.constant_epochs=2", "ray.num_workers=2",
            f"ray.resources_per_worker={json.dumps(SLOT)}", "evaluate.workers=2", "evaluate.batch_size=4"))
        keys = s3.keys("uml")
    log = dag.repro_log
    for stage in ("tune", "train", "evaluate"):
        assert f"Running stage '{stage}'" in log
    assert log.count(f"joining Ray cluster at {cluster.gcs}") == 3, log[-6000:]
    assert "starting a local Ray instance" not in log
    # The store: written to the bucket by prepare, found up to date by the three stages after it,
    # and what the training workers and evaluate's tasks opened.
    store = f"s3://uml-dag/uml/prepared/dataset.zarr (endpoint http://{s3.endpoint})"
    assert f"copied the prepared store on object storage: {store}" in log
    assert log.count(f"found an up-to-date copy of the prepared store on object storage: {store}") == 3, log[-6000:]
    assert log.count(f"reading the prepared store PreparedData('{store}'") >= 3  # the sweep's two trials and the train stage
    assert f"evaluating 3 passes as 6 Ray tasks (2 shards of at most 8 images each) reading {store}" in log
    local_store = sorted(p.relative_to(dag.data).as_posix() for p in (dag.data / "prepared").rglob("*") if p.is_file())
    assert [k for k in keys if "/prepared/" in k] == [f"uml-dag/uml/{rel}" for rel in local_store]
    # Ray's runs: the checkpoints of the train stage and the sweep are in the bucket, none under data/.
    assert any(k.startswith("uml-dag/uml/ray/train-") and "/checkpoint_" in k for k in keys), keys
    assert any(k.startswith("uml-dag/uml/ray/tune-") for k in keys), keys
    assert not (dag.data / "ray").exists()
    # Placement: the train stage's two workers ran on the two nodes (Ray's own record of the actors
    # of the driver `python -m pipeline.train`).
    assert sorted(cluster.checks("workers", "pipeline.train")["workers"]) == [HEAD_IP, WORKER_IP]
    # DDP kept the replicas identical: the parameter checksums of both ranks agreed every epoch.
    drift = (dag.data / "train" / "plots" / "metrics" / "ddp" / "param_drift.tsv").read_text().splitlines()[1:]
    assert [float(row.split("\t")[1]) for row in drift] == [0.0, 0.0]
    # 12 test images in batches of 4, 2 shards (8 + 4 images) per pass, 3 passes.
    assert "ran on 2 Ray node(s)" in log, log[-6000:]
    # The sweep's two trials ran on the cluster and recorded what they were tuned for: this store.
    written = yaml.safe_load((dag.data / "tune" / "best_params.yaml").read_text())
    assert written["selection"]["trials"] == 2
    assert written["tuned_for"]["data_hash"] == open_prepared(dag.data / "prepared" / "dataset.zarr").content_hash
    assert "up to date" in dag.status_after
    assert (dag.data / "reports" / "metrics.json").is_file()
