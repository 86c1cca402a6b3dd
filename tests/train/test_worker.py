"""The training loop's pieces run in-process, without a Ray cluster (one worker, Ray Train's
model and loader preparation replaced by the identity): resume from a checkpoint continues
exactly as the uninterrupted run; a training step reads nothing back from the device."""

from __future__ import annotations

import json
import logging
import re
import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import ray.train.torch
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from uml.config import Paths, load_params
from uml.data.prepare import prepare
from uml.data.store import open_prepared
from uml.models import ModelConfig, UMLNet
from uml.train import worker
from uml.train.trainer import model_config

from tests.train.tiny import write_tiny_params

CPU = torch.device("cpu")


class HostReads(TorchDispatchMode):
    """Every tensor whose value is read back to Python: ``.item()``, ``int()``, ``float()`` and
    ``bool()`` of a tensor all end in ``aten._local_scalar_dense``, and on a GPU each is a blocking
    host sync. Counted on the CPU here, where torch dispatches the same ops."""

    def __init__(self) -> None:
        super().__init__()
        self.tensors: list[torch.Tensor] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.tensors.append(args[0])  # kept alive, so data_ptr() identifies it afterwards
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    # 20 images: 8 train, 4 each in val, test and calib; 2 steps per epoch at batch 4, one pass.
    root = tmp_path_factory.mktemp("worker")
    params = load_params(write_tiny_params(root, data={"synthetic": {"num_images": 20, "render_size": 64}},
                                           train={"epochs": 2, "steps_per_epoch": None, "constant_epochs": 1,
                                                  "batch_size": 4}))
    prepare(params)
    data = open_prepared(Paths(params).dataset)
    return params, model_config(params, data.class_names, data.mask_classes, data.image_size).to_dict()


@pytest.fixture
def one_worker(monkeypatch):
    monkeypatch.setattr(ray.train.torch, "prepare_model", lambda model: model)
    monkeypatch.setattr(ray.train.torch, "prepare_data_loader", lambda loader: loader)


@pytest.mark.parametrize(("loader_workers", "steps_per_epoch"), [(0, None), (2, None), (0, 3), (2, 3)])
def test_a_resumed_run_continues_exactly_as_the_uninterrupted_one(tiny_store, one_worker, tmp_path, loader_workers,
                                                                  steps_per_epoch):
    # With loader workers, the uninterrupted run's second epoch reuses its persistent workers while
    # the restarted one starts new ones: neither may shift the random numbers the epoch draws. With
    # a fixed number of steps (3 of the 8 images' 2 per pass), epoch 1 continues the stream where
    # epoch 0 left it, mid-pass: a restarted run must find the same place.
    params, model_cfg = tiny_store
    params = params.with_overrides({"train.loader_workers": loader_workers, "train.steps_per_epoch": steps_per_epoch})
    store = str(Paths(params).dataset)
    data = worker.open_worker_data(params, store, rank=0, world=1, device=CPU)

    uninterrupted = worker.build_state(params, model_cfg, epochs=2, device=CPU)
    worker.train_one_epoch(uninterrupted, data, params, 0, 0, CPU, None)
    uninterrupted.history.append({"epoch": 0, "train/loss": 1.0})
    worker.save_state(uninterrupted, 0, tmp_path)
    expected_losses, expected_lr, _ = worker.train_one_epoch(uninterrupted, data, params, 1, 0, CPU, None)

    torch.manual_seed(123)  # the fresh process of a restarted worker: other global RNG state
    data = worker.open_worker_data(params, store, rank=0, world=1, device=CPU)  # and new loaders
    resumed = worker.build_state(params, model_cfg, epochs=2, device=CPU)
    assert worker.load_state(resumed, tmp_path) == 1
    assert resumed.history == [{"epoch": 0, "train/loss": 1.0}]
    assert all(s["step"].device == CPU for s in resumed.optimizer.state.values())
    losses, lr, steps = worker.train_one_epoch(resumed, data, params, 1, 0, CPU, None)

    assert steps == (steps_per_epoch or 2) and losses == expected_losses and lr == expected_lr
    assert resumed.scheduler.state_dict()["last_epoch"] == uninterrupted.scheduler.state_dict()["last_epoch"] == 2
    for (name, a), (_, b) in zip(uninterrupted.net.state_dict().items(), resumed.net.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    for a, b in zip(uninterrupted.optimizer.state_dict()["state"].values(),
                    resumed.optimizer.state_dict()["state"].values(), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_split_smaller_than_one_global_batch_is_refused(tiny_store, one_worker):
    params, _ = tiny_store
    big = params.with_overrides({"train.batch_size": 64})
    with pytest.raises(ValueError, match=r"smaller than one global batch of train.batch_size=64: lower the batch size"):
        worker.open_worker_data(big, str(Paths(params).dataset), rank=0, world=1, device=CPU)


def _reads_in_one_epoch(params, model_cfg, rank: int = 0) -> tuple[dict, int, list, list]:
    """Train epoch 0 under :class:`HostReads`: (losses, steps, Adam's counter reads per parameter
    tensor, other reads)."""
    data = worker.open_worker_data(params, str(Paths(params).dataset), rank=0, world=1, device=CPU)
    state = worker.build_state(params, model_cfg, epochs=2, device=CPU)
    with HostReads() as reads:
        losses, _, steps = worker.train_one_epoch(state, data, params, 0, rank, CPU, None, epochs=2)
    counters = {s["step"].data_ptr() for s in state.optimizer.state.values()}
    assert all(s["step"].device == CPU for s in state.optimizer.state.values())
    adam = [t for t in reads.tensors if t.data_ptr() in counters]
    return losses, steps, len(adam) / len(counters), [t for t in reads.tensors if t.data_ptr() not in counters]


@pytest.mark.parametrize("steps_per_epoch", [None, 3])
def test_a_training_step_reads_nothing_back_but_adams_cpu_step_counters(tiny_store, one_worker, steps_per_epoch):
    params, model_cfg = tiny_store
    params = params.with_overrides({"train.steps_per_epoch": steps_per_epoch})
    losses, steps, adam_per_tensor, others = _reads_in_one_epoch(params, model_cfg)
    # Adam (capturable=False) reads its step counter per parameter; those live on the CPU, not a sync.
    assert steps == (steps_per_epoch or 2) and adam_per_tensor == steps
    # Once per epoch, not per step: the mean of each logged loss, and the DataLoader's base seed
    # (a CPU tensor). A label check in the loss would add reads at every step (16 before); a
    # progress line reads the running loss, and the default interval (30 s) logs none here.
    assert len(others) == len(losses) + 1, [tuple(t.shape) for t in others]


def test_rank_0_logs_progress_within_the_epoch_reading_the_loss_only_for_a_line(tiny_store, one_worker, monkeypatch,
                                                                                 caplog):
    params, model_cfg = tiny_store
    monkeypatch.setattr(worker, "PROGRESS_SECONDS", 0.0)  # a line after every step but the last
    with caplog.at_level(logging.INFO, logger="uml.train"):
        losses, steps, _, others = _reads_in_one_epoch(params.with_overrides({"train.steps_per_epoch": 3}), model_cfg)
    lines = [r.getMessage() for r in caplog.records if " step " in r.getMessage()]
    assert steps == 3 and len(lines) == 2, lines
    assert len(others) == len(losses) + 1 + len(lines)  # one read per line, none per step
    found = [re.fullmatch(r"epoch   1/2  step (\d)/3  ([\d.]+) img/s  loss ([\d.]+) \(running mean, rank 0\)", line)
             for line in lines]
    assert all(found), lines
    assert [int(m.group(1)) for m in found] == [1, 2] and all(float(m.group(2)) > 0 for m in found)
    # The running mean after k steps is the mean loss of an epoch of k steps: the same first draws
    # (the stream does not depend on the epoch's length) from the same initial state.
    for m in found:
        k = int(m.group(1))
        short, _, _, _ = _reads_in_one_epoch(params.with_overrides({"train.steps_per_epoch": k}), model_cfg)
        assert float(m.group(3)) == pytest.approx(short["train/loss"], abs=5e-4), (k, m.group(0))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="uml.train"):
        _, _, _, others = _reads_in_one_epoch(params.with_overrides({"train.steps_per_epoch": 3}), model_cfg, rank=1)
    assert not [r for r in caplog.records if " step " in r.getMessage()]  # only rank 0 logs
    assert len(others) == len(losses) + 1


def test_a_resume_keeps_adams_step_counters_on_the_cpu_and_the_rest_on_the_model_device(tiny_store, one_worker,
                                                                                        tmp_path):
    # "meta" stands in for a GPU: a device other than the CPU that the test machine has.
    params, model_cfg = tiny_store
    trained = worker.build_state(params, model_cfg, epochs=2, device=CPU)
    trained.model(torch.rand(2, 3, 64, 64))["class_logits"].sum().backward()
    trained.optimizer.step()
    worker.save_state(trained, 0, tmp_path)

    net = UMLNet(ModelConfig.from_dict(model_cfg)).to("meta")
    optimizer = torch.optim.Adam(net.parameters(), lr=params.train.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)
    on_device = worker.TrainingState(net, optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # copying weights into meta tensors is a no-op
        assert worker.load_state(on_device, tmp_path) == 1
    moments = [s for s in optimizer.state.values()]
    assert len(moments) == len(trained.optimizer.state) > 0
    assert all(s["step"].device == CPU and float(s["step"]) == 1.0 for s in moments)
    assert all(s["exp_avg"].device.type == "meta" and s["exp_avg_sq"].device.type == "meta" for s in moments)


class InProcessRay:
    """Ray Train's worker API for one worker in this process: ``report`` calls are recorded and
    each attached checkpoint folder is copied (a sync report's folder is deleted once it returns)."""

    def __init__(self, root: Path, resume_from: Path | None = None) -> None:
        self.root, self.resume_from = root, resume_from
        self.reports: list[dict] = []

    def report(self, metrics, checkpoint=None, checkpoint_upload_mode=ray.train.CheckpointUploadMode.SYNC,
               delete_local_checkpoint_after_upload=None):
        copy = None
        if checkpoint is not None:
            copy = self.root / f"report-{len(self.reports)}"
            shutil.copytree(checkpoint.path, copy)
        self.reports.append({"metrics": metrics, "copy": copy, "mode": checkpoint_upload_mode,
                             "folder": Path(checkpoint.path) if checkpoint else None,
                             "delete_after_upload": delete_local_checkpoint_after_upload})

    def install(self, monkeypatch) -> None:
        context = SimpleNamespace(get_world_rank=lambda: 0, get_world_size=lambda: 1)
        monkeypatch.setattr(ray.train, "report", self.report)
        monkeypatch.setattr(ray.train, "get_context", lambda: context)
        monkeypatch.setattr(ray.train, "get_checkpoint",
                            lambda: ray.train.Checkpoint.from_directory(str(self.resume_from)) if self.resume_from else None)
        monkeypatch.setattr(ray.train.torch, "get_device", lambda: CPU)


def _run_loop(params, model_cfg, epochs, ray_api, monkeypatch) -> list[dict]:
    ray_api.install(monkeypatch)
    worker.train_loop_per_worker({"params": params.model_dump(), "model": model_cfg,
                                  "store": str(Paths(params).dataset), "epochs": epochs})
    return ray_api.reports


def _outcome(row: dict[str, float]) -> dict[str, float]:
    """A reported row without its timings."""
    return {k: v for k, v in row.items() if k not in ("epoch_seconds", "images_per_second")}


def test_checkpoint_every_two_epochs_of_three_and_a_resume_from_the_second(tiny_store, one_worker, tmp_path, monkeypatch):
    params, model_cfg = tiny_store
    params = params.with_overrides({"train.checkpoint_every": 2})
    reports = _run_loop(params, model_cfg, 3, InProcessRay(tmp_path / "full"), monkeypatch)
    assert [int(r["metrics"]["epoch"]) for r in reports] == [0, 1, 2]  # every epoch reports its metrics
    # Epoch 2 of 3 (the 2nd) is due by the cadence, epoch 3 as the last; epoch 1 is not.
    assert [r["copy"] is not None for r in reports] == [False, True, True]
    assert all(r["mode"] is ray.train.CheckpointUploadMode.SYNC for r in reports)
    second = reports[1]["copy"]
    assert json.loads((second / worker.HISTORY_FILE).read_text()) == [reports[0]["metrics"], reports[1]["metrics"]]

    resumed = _run_loop(params, model_cfg, 3, InProcessRay(tmp_path / "resumed", resume_from=second), monkeypatch)
    assert [int(r["metrics"]["epoch"]) for r in resumed] == [2]  # only the epoch after the checkpoint
    assert _outcome(resumed[0]["metrics"]) == _outcome(reports[2]["metrics"])  # exactly as uninterrupted
    final = torch.load(resumed[0]["copy"] / worker.STATE_FILE, weights_only=True)
    expected = torch.load(reports[2]["copy"] / worker.STATE_FILE, weights_only=True)
    assert final["epoch"] == 2 and [int(r["epoch"]) for r in final["history"]] == [0, 1, 2]
    for name, tensor in expected["model"].items():
        assert torch.equal(final["model"][name], tensor), name


def test_async_upload_hands_ray_a_folder_that_outlives_the_report(tiny_store, one_worker, tmp_path, monkeypatch):
    params, model_cfg = tiny_store
    params = params.with_overrides({"train.checkpoint_upload": "async"})
    [report] = _run_loop(params, model_cfg, 1, InProcessRay(tmp_path), monkeypatch)
    assert report["mode"] is ray.train.CheckpointUploadMode.ASYNC and report["delete_after_upload"] is True
    # Ray uploads it later from a background thread and then deletes it: it must still be there.
    assert (report["folder"] / worker.STATE_FILE).is_file()
    assert torch.load(report["folder"] / worker.STATE_FILE, weights_only=True)["epoch"] == 0
    shutil.rmtree(report["folder"])


@pytest.mark.parametrize(("every", "due"), [(1, [0, 1, 2, 3, 4]), (2, [1, 3, 4]), (3, [2, 4]), (10, [4])])
def test_checkpoint_due_every_nth_epoch_and_the_last(every, due):
    assert [e for e in range(5) if worker.checkpoint_due(e, 5, every)] == due
