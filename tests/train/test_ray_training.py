"""Ray Train on this CPU machine with 2 workers: learning, identical replicas, tuned loss weights,
checkpoint resume after a crash, and recovery from a failing worker."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import ray
import ray.cloudpickle
import torch
import yaml

from uml.config import Paths, load_params
from uml.data.prepare import prepare
from uml.data.store import open_prepared
from uml.models import load_model
from uml.provenance import code_fingerprint, tuning_target
from uml.train.cluster import ray_session
from uml.train.checkpoints import read_history
from uml.train.trainer import model_config, run_trainer, train
from uml.train.worker import SCORE_KEY, train_loop_per_worker

from tests.train.test_sockets import TRAIN_WORKER, _is_loopback, _is_loopback_interface, _listeners, _process_titles
from tests.train.tiny import write_tiny_params

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny prepared data set + params, and one local Ray instance for the module."""
    root = tmp_path_factory.mktemp("train")
    path = write_tiny_params(root)
    params = load_params(path)
    prepare(params)
    with ray_session(params):
        yield path, params


@pytest.fixture(scope="module")
def learned(tiny, tmp_path_factory):
    """One train stage with tuned loss weights (recorded for exactly this configuration, as the
    tune stage records them), run once for the module. Its outputs are copied aside: later
    train stages of the module write the same files (the edited-code test reruns on top of it)."""
    path, params = tiny
    paths = Paths(params)
    paths.tune_dir.mkdir(parents=True, exist_ok=True)
    tuned_for = tuning_target(params.resolved(), open_prepared(paths.dataset).content_hash)
    paths.best_params.write_text(yaml.safe_dump({"loss": {"cls_weight": 0.31, "seg_weight": 0.62, "mut_weight": 0.07},
                                                 "tuned_for": tuned_for}))
    model_path = train(params)
    kept = tmp_path_factory.mktemp("learned")
    shutil.copytree(paths.train_dir, kept / "train")
    shutil.copy2(model_path, kept / "model.pt")
    return kept


def test_tiny_run_learns_with_identical_replicas_and_tuned_weights(tiny, learned):
    _, params = tiny
    model = load_model(learned / "model.pt")
    train_dir = learned / "train"
    assert model.cfg.image_size == 64 and model.extra["loss"]["cls_weight"] == 0.31
    assert model.extra["code_fingerprint"] == code_fingerprint("train")
    logged = yaml.safe_load((train_dir / "params.yaml").read_text())
    assert logged["loss"]["cls_weight"] == 0.31 and logged["loss"]["seg_weight"] == 0.62 and logged["tuned_from"]
    history = json.loads((train_dir / "metrics.json").read_text())
    assert history["step"] == params.train.epochs - 1
    tsv = (train_dir / "plots" / "metrics" / "val" / "score.tsv").read_text().splitlines()
    scores = [float(line.split("\t")[1]) for line in tsv[1:]]
    assert len(scores) == params.train.epochs
    assert max(scores[1:]) > scores[0], f"validation score did not improve on epoch 1: {scores}"
    drift = [float(line.split("\t")[1]) for line in (train_dir / "plots" / "metrics" / "ddp" / "param_drift.tsv").read_text().splitlines()[1:]]
    assert drift == [0.0] * params.train.epochs  # DDP kept both replicas identical
    assert (train_dir / "progress.png").stat().st_size > 10_000
    # The saved weights are those of the best epoch.
    assert model.extra["best_metrics"][SCORE_KEY] == pytest.approx(max(scores))
    # A local instance runs Ray Train without its preemption watcher (uml.train.cluster.LOCAL_TRAIN_ENV),
    # as Ray's own record of the run's actors shows.
    from ray.util.state import list_actors

    actors = {actor.class_name for actor in list_actors(limit=1000)}
    assert {"TrainController", "RayTrainWorker"} <= actors and "PreemptionWatcher" not in actors, actors


def test_edited_code_trains_afresh_instead_of_restoring_the_finished_run(tiny, learned, monkeypatch, caplog):
    """Issue 14: after editing uml/losses.py a rerun restored the finished run's weights. The
    finished run is the module's first (:func:`learned`), same params and data; the edit is
    simulated in the fingerprint's input (the shared tree is not edited); the rest is real.
    Rerun first with the code unchanged, the finished run continues instead: it trains no epoch,
    writes no checkpoint (a fresh run would write its own) and saves the same weights. (A run
    interrupted mid-way resumes from its checkpoint: the crash-and-resume test below.)"""
    from uml.train import trainer

    _, params = tiny
    storage = Paths(params).ray_storage
    learned_model = load_model(learned / "model.pt")
    first = learned_model.extra["run"]

    def first_run_checkpoints() -> list[str]:
        return sorted(p.relative_to(storage).as_posix() for p in (storage / first).rglob("checkpoint_*"))

    checkpoints = first_run_checkpoints()
    assert checkpoints
    with caplog.at_level(logging.INFO, logger="uml.provenance"):
        unchanged = load_model(train(params))
    assert f"run '{first}' continues the earlier run" in caplog.text
    assert first_run_checkpoints() == checkpoints
    assert unchanged.extra["run"] == first and unchanged.extra["best_epoch"] == learned_model.extra["best_epoch"]
    learned_state, unchanged_state = learned_model.state_dict(), unchanged.state_dict()
    assert unchanged_state.keys() == learned_state.keys()
    for key, value in unchanged_state.items():
        assert torch.equal(value, learned_state[key]), key
    caplog.clear()

    real_code_files = trainer.code_files
    monkeypatch.setattr(trainer, "code_files", lambda stage: {**real_code_files(stage), "uml/losses.py": "edited"})
    with caplog.at_level(logging.INFO, logger="uml.provenance"):
        edited = load_model(train(params)).extra["run"]
    assert edited != first and (storage / edited).is_dir() and (storage / first).is_dir()
    assert f"fresh run '{edited}': the last one, '{first}', had other code (uml/losses.py)" in caplog.text
    history = json.loads((Paths(params).train_dir / "metrics.json").read_text())
    assert history["step"] == params.train.epochs - 1  # every epoch trained again


def _fail_once_after_first_epoch(config):
    """The real training loop, whose rank 0 raises once after reporting its first epoch."""
    import ray.train as ray_train

    from uml.train import worker

    marker = Path(config["params"]["data"]["root"]) / "failed-once"
    real_report = ray_train.report

    def report_then_fail(metrics, checkpoint=None, **kwargs):
        real_report(metrics, checkpoint=checkpoint, **kwargs)
        if metrics["epoch"] == 0 and ray_train.get_context().get_world_rank() == 0 and not marker.exists():
            marker.write_text("rank 0 raised after epoch 1\n")
            raise RuntimeError("injected worker failure")

    ray_train.report = report_then_fail
    try:
        worker.train_loop_per_worker(config)
    finally:
        ray_train.report = real_report


def test_a_worker_that_raises_once_is_recovered_from_its_checkpoint(tiny):
    _, params = tiny
    params = params.resolved().with_overrides({"ray.max_failures": 1})
    data = open_prepared(Paths(params).dataset)
    cfg = model_config(params, data.class_names, data.mask_classes, data.image_size)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        result = run_trainer(params, name="recover-once", model_cfg=cfg, epochs=2, train_loop=_fail_once_after_first_epoch)
    finally:
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert (Path(params.data.root) / "failed-once").exists()  # the failure did happen
    history = read_history(result.checkpoint)
    assert [int(r["epoch"]) for r in history] == [0, 1]  # resumed after epoch 0, nothing repeated or lost
    assert result.error is None


def test_a_crashed_run_resumes_from_its_checkpoint_on_object_storage(tiny, tmp_path, monkeypatch):
    """SIGKILL of a whole train stage (driver, Ray and workers) at a known point, then a plain rerun,
    with ``ray.storage_path`` on object storage: an S3-compatible server (moto) on 127.0.0.1,
    reached through the URI's own options (pyarrow's ``endpoint_override`` and ``scheme``), the way
    a user points Ray at MinIO. A local ``ray.storage_path`` goes through the same code (pyarrow's
    filesystem API reads both; the other tests of this module train on a local one).

    The run is held, not raced: tests/train/blocked_train.py is the train stage whose rank 0 stops
    after reporting epoch 2's checkpoint. Once the driver has logged that epoch (its dvclive
    callback runs after Ray Train has registered the checkpoint), the process group is killed;
    the rerun must resume from epoch 2 whatever the speed of the machine. (It used to poll for two
    checkpoint folders, which coexist only briefly with num_to_keep=1: a fast machine missed them.)

    The held run is also where the local run's sockets are checked: while it waits, every process
    it started (Ray's services, the driver, the training workers with their DDP rendezvous store
    and gloo) is alive and listening, so each listener is seen at a known point instead of being
    sampled during a run that might end first. All of them must be on loopback.
    """
    from tests.s3 import s3_server
    from tests.train.blocked_train import marker

    path, params = tiny
    crash_params = tmp_path / "params.yaml"
    raw = yaml.safe_load(path.read_text())
    raw["train"].update(epochs=3, seed=7, use_tuned=False)  # its own run name
    train_log = Paths(params).train_dir / "metrics.json"
    train_log.unlink(missing_ok=True)

    def logged_step() -> int | None:
        try:
            return json.loads(train_log.read_text())["step"]
        except (OSError, ValueError, KeyError):  # not written yet, or caught mid-write
            return None

    with s3_server(monkeypatch, "uml-runs") as s3:
        raw["ray"]["storage_path"] = s3.uri("uml")
        crash_params.write_text(yaml.safe_dump(raw))
        # Its own local Ray instance, like a user's run; the server's credentials reach the driver,
        # the Ray workers and the controller through the environment (as an operator's would).
        env = {**os.environ, "RAY_ADDRESS": ""}
        held = [sys.executable, "-m", "tests.train.blocked_train", "--block-after", "2", "--params", str(crash_params)]
        proc = subprocess.Popen(held, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            deadline = time.time() + 400
            while logged_step() != 1 and proc.poll() is None and time.time() < deadline:
                time.sleep(0.5)
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert marker(params.data.root, 2).exists() and logged_step() == 1, "the run did not reach epoch 2 in time"
            _assert_the_held_run_listens_on_loopback_only(psutil.Process(proc.pid))
        finally:
            os.killpg(proc.pid, signal.SIGKILL)  # a crash: no cleanup, no graceful abort
            proc.wait()
        cmd = [sys.executable, "-m", "pipeline.train", "--params", str(crash_params)]
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
        log = done.stdout + done.stderr
        assert done.returncode == 0, log[-3000:]
        assert "continues the earlier run of the same params, data and code" in log
        assert "resuming from the checkpoint of epoch 2 (2/3 epochs done)" in log, log[-3000:]
        resumed = log.split("resuming from the checkpoint")[1]
        assert "epoch   1/3" not in resumed and "epoch   2/3" not in resumed  # nothing trained twice
        assert "epoch   3/3" in resumed
        history = json.loads(train_log.read_text())
        assert history["step"] == 2
        state = torch.load(Paths(params).model_pt, weights_only=True)
        run = state["extra"]["run"]
        assert run.startswith("train-")
        # The logged history has each epoch once, in order: the two before the crash and the one after.
        rows = (Paths(params).train_dir / "plots" / "metrics" / "val" / "score.tsv").read_text().splitlines()[1:]
        assert [int(row.split("\t")[0]) for row in rows] == [0, 1, 2]
        # The run lives in the bucket: Ray's checkpoints and the run record; nothing in the local storage.
        keys = s3.keys("uml")
        assert any(key.startswith(f"uml-runs/uml/{run}/") and "/checkpoint_" in key for key in keys), keys
        assert f"uml-runs/uml/uml-run-inputs/{run}.json" in keys, keys
        assert not (Paths(params).ray_storage / run).exists()


def _assert_the_held_run_listens_on_loopback_only(driver: psutil.Process) -> None:
    """Every listening socket of the held run's process tree is on loopback, the training workers'
    own listeners (the rendezvous store on rank 0, gloo on both) and Ray's services among them, and
    the workers were told to bind gloo to a loopback interface."""
    listeners = _listeners(driver)
    exposed = {address: who for address, who in listeners.items() if not _is_loopback(address[0])}
    assert not exposed, f"listening beyond loopback: {exposed}"
    assert {"gcs_server", "raylet"} <= {name for _, name in listeners.values()}, listeners
    worker_pids = {pid for pid, title in _process_titles(driver).items() if title.startswith(TRAIN_WORKER)}
    assert len(worker_pids) == 2, listeners  # ray.num_workers
    assert len([pid for pid, _ in listeners.values() if pid in worker_pids]) >= 3, listeners
    assert all(_is_loopback_interface(psutil.Process(pid).environ().get("GLOO_SOCKET_IFNAME", "")) for pid in worker_pids)


class _ReportLog(ray.train.UserCallback):
    """Appends ``<epoch> <has checkpoint>`` per report the controller receives, to a file."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def after_report(self, run_context, metrics, checkpoint) -> None:
        with open(self.path, "a") as out:
            out.write(f"{int(metrics[0]['epoch'])} {checkpoint is not None}\n")


def test_async_checkpoints_every_second_epoch_reach_the_driver(tiny, tmp_path):
    """Ray Train's background upload (train.checkpoint_upload: async) with train.checkpoint_every:
    2 over 3 epochs: every epoch's metrics arrive, only epochs 2 and 3 carry checkpoints, and the
    run ends after the last upload has been registered."""
    _, params = tiny
    params = params.resolved().with_overrides({"train.checkpoint_every": 2, "train.checkpoint_upload": "async"})
    data = open_prepared(Paths(params).dataset)
    cfg = model_config(params, data.class_names, data.mask_classes, data.image_size)
    reports = tmp_path / "reports.txt"
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        result = run_trainer(params, name="async-every-2", model_cfg=cfg, epochs=3, callbacks=[_ReportLog(reports)])
    finally:
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert result.error is None
    assert reports.read_text().splitlines() == ["0 False", "1 True", "2 True"]
    with result.checkpoint.as_directory() as latest:
        state = torch.load(Path(latest) / "state.pt", weights_only=True)
    assert state["epoch"] == 2 and [int(r["epoch"]) for r in read_history(result.checkpoint)] == [0, 1, 2]
