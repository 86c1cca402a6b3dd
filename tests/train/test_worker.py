"""The training loop's pieces run in-process, without a Ray cluster (one worker, Ray Train's
model and loader preparation replaced by the identity): resume from a checkpoint continues
exactly as the uninterrupted run."""

from __future__ import annotations

import pytest
import ray.train.torch
import torch

from uml.config import Paths, load_params
from uml.data.prepare import prepare
from uml.data.store import open_prepared
from uml.train import worker
from uml.train.trainer import model_config

from tests.train.tiny import write_tiny_params

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("worker")
    params = load_params(write_tiny_params(root, data={"synthetic": {"num_images": 16, "render_size": 64}},
                                           train={"epochs": 2, "constant_epochs": 1, "batch_size": 4}))
    prepare(params)
    data = open_prepared(Paths(params).dataset)
    return params, model_config(params, data.class_names, data.mask_classes, data.image_size).to_dict()


@pytest.fixture
def one_worker(monkeypatch):
    monkeypatch.setattr(ray.train.torch, "prepare_model", lambda model: model)
    monkeypatch.setattr(ray.train.torch, "prepare_data_loader", lambda loader: loader)


def test_a_resumed_run_continues_exactly_as_the_uninterrupted_one(tiny_store, one_worker, tmp_path):
    params, model_cfg = tiny_store
    store = str(Paths(params).dataset)
    data = worker.open_worker_data(params, store, rank=0, world=1, device=CPU)

    uninterrupted = worker.build_state(params, model_cfg, epochs=2, device=CPU)
    worker.train_one_epoch(uninterrupted, data, params, 0, 0, CPU, None)
    uninterrupted.history.append({"epoch": 0, "train/loss": 1.0})
    worker.save_state(uninterrupted, 0, tmp_path)
    expected_losses, expected_lr, _ = worker.train_one_epoch(uninterrupted, data, params, 1, 0, CPU, None)

    torch.manual_seed(123)  # the fresh process of a restarted worker: other global RNG state
    resumed = worker.build_state(params, model_cfg, epochs=2, device=CPU)
    assert worker.load_state(resumed, tmp_path, CPU) == 1
    assert resumed.history == [{"epoch": 0, "train/loss": 1.0}]
    losses, lr, steps = worker.train_one_epoch(resumed, data, params, 1, 0, CPU, None)

    assert steps == 2 and losses == expected_losses and lr == expected_lr
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
