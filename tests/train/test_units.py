"""Training pieces that need no Ray cluster: LR schedule, sharding, search space,
tuned params, run names."""

import re

import numpy as np
import pytest
import torch
import yaml
from torch.utils.data import DistributedSampler

from uml.config import Params, Paths, parse_params
from uml.errors import ClusterError, ConfigError
from uml.train.schedule import ConstantThenPoly, build_scheduler
from uml.train.sweep import build_search_space
from uml.provenance import flatten
from uml.train.trainer import run_name
from uml.train.tuned import effective_params
from uml.train.worker import selection_score, validation_share


def test_schedule_is_constant_then_poly_with_floor():
    schedule = ConstantThenPoly(epochs=10, constant_epochs=4, power=0.9, floor=0.01)
    values = [schedule(e) for e in range(12)]
    assert values[:4] == [1.0] * 4
    assert values[4] == pytest.approx(1.0)
    assert values[5] == pytest.approx((1 - 1 / 6) ** 0.9)
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert values[9] == pytest.approx(max(0.01, (1 / 6) ** 0.9)) and values[10] == values[11] == 0.01


def test_scheduler_state_round_trips_through_a_checkpoint():
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = build_scheduler(opt, epochs=10, constant_epochs=2, power=0.9, lr=1e-3, min_lr=1e-5)
    for _ in range(5):
        opt.step()
        sched.step()
    state = sched.state_dict()
    opt2 = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched2 = build_scheduler(opt2, epochs=10, constant_epochs=2, power=0.9, lr=1e-3, min_lr=1e-5)
    sched2.load_state_dict(state)
    opt2.load_state_dict(opt.state_dict())
    assert sched2.get_last_lr() == sched.get_last_lr() and sched2.last_epoch == 5


@pytest.mark.parametrize("n", [10, 11])
def test_training_shards_cover_the_split_and_only_padding_overlaps(n):
    """What the worker loop builds: DistributedSampler(shuffle, seed) per rank."""
    shards = [list(DistributedSampler(range(n), num_replicas=2, rank=r, shuffle=True, seed=3)) for r in (0, 1)]
    assert set(shards[0]) | set(shards[1]) == set(range(n))
    assert len(shards[0]) == len(shards[1])  # DDP needs equal step counts
    overlap = len(shards[0]) + len(shards[1]) - n
    assert len(set(shards[0]) & set(shards[1])) == overlap == (n % 2)  # disjoint up to the padding sample


@pytest.mark.parametrize("world", [1, 2, 3])
def test_validation_shares_are_disjoint_and_cover(world):
    indices = np.arange(17) * 3
    shares = [validation_share(indices, r, world) for r in range(world)]
    joined = np.concatenate(shares)
    assert sorted(joined.tolist()) == indices.tolist() and len(joined) == len(set(joined.tolist()))


def test_selection_score_is_the_published_mean():
    assert selection_score({"cls/acc": 0.8, "cls/f1": 0.6, "seg/dice_disc": 0.9, "seg/dice_cup": 0.7, "cls/auc": 0.1}) == pytest.approx(0.75)
    assert selection_score({"seg/dice_disc": 0.9, "seg/dice_cup": 0.7}) == pytest.approx(0.8)  # seg-only
    assert selection_score({"cls/acc": 0.8, "cls/f1": float("nan")}) == pytest.approx(0.8)


def test_search_space_is_validated():
    assert set(build_search_space(Params())) == {"loss.cls_weight", "loss.seg_weight", "loss.mut_weight"}
    cases = [
        # When the params load: the shape and arguments of each distribution, naming file and key.
        ({"loss.cls_weight": {"gaussian": [0, 1]}}, r"p\.yaml: tune\.search_space: .*loss\.cls_weight: unknown distribution 'gaussian'"),
        ({"loss.cls_weight": {"uniform": [0.9, 0.1]}}, r"p\.yaml: tune\.search_space\.loss\.cls_weight\.uniform: .*low < high, got \[0\.9, 0\.1\]"),
        ({"loss.mut_weight": {"loguniform": [0, 1]}}, r"loss\.mut_weight\.loguniform: .*low > 0, got 0"),
        ({"loss.kl_annealing_epochs": {"randint": [1.5, 5]}}, r"randint needs integer bounds, got \[1\.5, 5\]"),
        ({"loss.cls_weight": {"uniform": [True, 1]}}, r"uniform needs \[low, high\] numbers"),
        ({"loss.cls_weight": [0.1, 0.2]}, "loss.cls_weight: expected one distribution"),
        ({"loss.cls_weight": {"uniform": [0.1, 0.2], "choice": [0.3]}}, "expected one distribution"),
        # When the sweep starts: the keys and every value a distribution can draw.
        ({"loss.nope": {"uniform": [0, 1]}}, "not a params key"),
        ({"loss.kl_annealing_epochs": {"randint": [0, 5]}}, "invalid value 0"),
        ({"loss.cls_weight": {"uniform": [-1, 1]}}, "invalid value -1"),
        ({"ray.num_workers": {"choice": [1, 2]}}, "cannot be searched"),
        ({}, "empty"),
    ]
    for space, message in cases:
        with pytest.raises(ConfigError, match=message):
            build_search_space(parse_params({"tune": {"search_space": space}}, source="p.yaml"))


def test_search_space_bounds_keep_their_type():
    """A sweep's name hashes the search space: bounds written as integers must stay integers."""
    params = parse_params({"tune": {"search_space": {"loss.cls_weight": {"uniform": [0, 1]},
                                                     "model.dropout": {"choice": [0.0, 0.1]}}}})
    assert params.tune.model_dump(mode="json")["search_space"] == {"loss.cls_weight": {"uniform": [0, 1]},
                                                                   "model.dropout": {"choice": [0.0, 0.1]}}
    assert isinstance(params.tune.search_space["loss.cls_weight"].uniform[0], int)


def _tuned_for(**changes):
    """What best_params.yaml records for the default params on data "h" with code fingerprint "c"."""
    record = {"model": Params().model.model_dump(mode="json"), "data_hash": "h",
              "search_space": {k: dict(v) for k, v in Params().tune.search_space.items()}, "code": "c"}
    record.update(changes)
    return record


@pytest.fixture
def tuned_file(tmp_path, monkeypatch):
    """Default params under tmp_path, the tune stage's code fingerprint pinned to "c"."""
    import uml.provenance

    monkeypatch.setattr(uml.provenance, "code_fingerprint", lambda stage: "c" if stage == "tune" else "other")
    params = Params().with_overrides({"data.root": str(tmp_path)})
    Paths(params).tune_dir.mkdir(parents=True)
    return params, Paths(params).best_params


def test_tuned_values_apply_when_tuned_for_this_model_data_space_and_code(tuned_file):
    params, path = tuned_file
    path.unlink(missing_ok=True)
    assert effective_params(params, "h") == (params, {})  # no sweep yet: params as they are
    path.write_text(yaml.safe_dump({"loss": {"cls_weight": 0.123, "kl_annealing_epochs": 3},
                                    "selection": {"chosen": "sampled"}, "tuned_for": _tuned_for()}))
    tuned, applied = effective_params(params, "h")
    assert applied == {"loss.cls_weight": 0.123, "loss.kl_annealing_epochs": 3}
    assert tuned.loss.cls_weight == 0.123 and tuned.loss.kl_annealing_epochs == 3 and tuned.loss.seg_weight == params.loss.seg_weight
    off, applied = effective_params(params.with_overrides({"train.use_tuned": False}), "h")
    assert applied == {} and off.loss.cls_weight == params.loss.cls_weight
    path.write_text(yaml.safe_dump({"loss": {"cls_weight": -3}, "tuned_for": _tuned_for()}))
    with pytest.raises(ConfigError, match="cls_weight"):
        effective_params(params, "h")


@pytest.mark.parametrize(("tuned_for", "data_hash", "why"), [
    # Issue 14: values tuned on the small preset must not override the paper preset's.
    (_tuned_for(model={**Params().model.model_dump(mode="json"), "preset": "paper"}), "h",
     r"another model: model\.preset 'paper' \(now 'small'\)"),
    (_tuned_for(), "other-data", r"other data \(content hash h, now other-data\)"),
    (_tuned_for(search_space={"loss.cls_weight": {"uniform": [0.1, 0.2]}}), "h", "another tune.search_space"),
    (_tuned_for(code="old"), "h", r"other code \(tune stage fingerprint old, now c\)"),
    (None, "h", "records nothing about what it was tuned for"),
])
def test_tuned_values_of_another_configuration_are_not_used(tuned_file, caplog, tuned_for, data_hash, why):
    params, path = tuned_file
    content = {"loss": {"cls_weight": 0.123}}
    if tuned_for is not None:
        content["tuned_for"] = tuned_for
    path.write_text(yaml.safe_dump(content))
    with caplog.at_level("WARNING", logger="uml.train.tuned"):
        used, applied = effective_params(params, data_hash)
    assert applied == {} and used.loss.cls_weight == params.loss.cls_weight == 0.5
    assert "not using the tuned values of" in caplog.text and "using the params as written" in caplog.text.lower()
    assert re.search(why, caplog.text), caplog.text


def test_run_name_is_deterministic_and_tracks_params_data_and_code():
    params = Params()
    code = {"uml/losses.py": "aa", "uml/train/worker.py": "bb"}
    name = run_name(params, "abc", code)
    assert name.startswith("train-") and name == run_name(Params(), "abc", dict(code))
    assert name != run_name(params, "abd", code)  # other data
    assert name != run_name(params, "abc", {**code, "uml/losses.py": "a2"})  # edited code
    assert name != run_name(params, "abc", {**code, "uml/new.py": "cc"})  # code added
    assert name != run_name(params.with_overrides({"loss.cls_weight": 0.3}), "abc", code)
    assert name != run_name(params.with_overrides({"ray.num_workers": 3}), "abc", code)
    assert name != run_name(params.with_overrides({"data.augment.hflip": 0.1}), "abc", code)
    # What does not change the result does not rename the run (an interrupted run still resumes).
    for same in ({"train.loader_workers": 4}, {"train.use_tuned": False}, {"train.checkpoint_upload": "async"},
                 {"train.cudnn_benchmark": False}, {"ray.max_failures": 5}, {"ray.collective_timeout_s": 60},
                 {"ray.resources_per_worker": {"CPU": 2}}, {"data.root": "/elsewhere"}, {"tune.num_samples": 9}):
        assert name == run_name(params.with_overrides(same), "abc", code), same


def test_every_train_key_is_in_the_run_identity_or_excluded_on_purpose():
    from uml.config import TrainParams
    from uml.train.trainer import TRAIN_KEYS_NOT_IN_IDENTITY, train_identity_keys

    excluded = {"loader_workers", "checkpoint_upload", "use_tuned", "cudnn_benchmark"}
    assert set(TRAIN_KEYS_NOT_IN_IDENTITY) == excluded
    hashed = {k.split(".", 1)[1] for k in train_identity_keys() if k.startswith("train.")}
    assert hashed == set(TrainParams.model_fields) - excluded
    assert "checkpoint_every" in hashed  # the best model is chosen among the checkpointed epochs


def test_flatten_nested_params():
    assert flatten({"loss": {"cls_weight": 0.3, "x": {"y": 1}}}) == {"loss.cls_weight": 0.3, "loss.x.y": 1}
    assert flatten({"cls": {"auc": 0.9}, "n": 3}, sep="/") == {"cls/auc": 0.9, "n": 3}  # DVC metric names


def test_workers_get_params_that_validate_strictly_again(tmp_path, monkeypatch):
    """Ray ships the params to the workers as a dict that they validate again (strict types):
    data.mask_values' int keys must arrive as ints, which a JSON-mode dump would make strings."""
    from types import SimpleNamespace

    from uml.config import parse_params
    from uml.train import trainer

    shipped = {}

    class CapturingTrainer:
        def __init__(self, loop, *, train_loop_config, **kwargs):
            shipped.update(train_loop_config)

        def fit(self):
            raise RuntimeError("captured")

    monkeypatch.setattr(trainer, "TorchTrainer", CapturingTrainer)
    params = parse_params({"data": {"root": str(tmp_path), "mask_values": {0: 0, 128: 1, 255: 2}}})
    with pytest.raises(RuntimeError, match="captured"):
        trainer.run_trainer(params, name="x", model_cfg=SimpleNamespace(to_dict=dict), epochs=1)
    assert parse_params(shipped["params"], source="train config").model_dump() == params.model_dump()


def test_the_trainer_gets_the_collective_timeout(tmp_path, monkeypatch):
    """ray.collective_timeout_s becomes the TorchConfig timeout of the process group (what the
    workers then see: tests/train/test_cluster.py)."""
    from types import SimpleNamespace

    from uml.train import trainer
    from uml.train.rendezvous import BoundTorchConfig

    shipped = {}

    class CapturingTrainer:
        def __init__(self, loop, *, torch_config, **kwargs):
            shipped["torch_config"] = torch_config

        def fit(self):
            raise RuntimeError("captured")

    monkeypatch.setattr(trainer, "TorchTrainer", CapturingTrainer)
    for seconds in (1800, 75):
        params = parse_params({"data": {"root": str(tmp_path)}, "ray": {"collective_timeout_s": seconds}})
        with pytest.raises(RuntimeError, match="captured"):
            trainer.run_trainer(params, name="x", model_cfg=SimpleNamespace(to_dict=dict), epochs=1)
        config = shipped["torch_config"]
        assert isinstance(config, BoundTorchConfig) and (config.backend, config.timeout_s) == ("gloo", seconds)
    with pytest.raises(ConfigError, match=r"ray\.collective_timeout_s"):
        parse_params({"ray": {"collective_timeout_s": 0}})


@pytest.mark.parametrize(("device", "setting", "expected"), [
    ("cuda", True, True), ("cuda", False, False),
    # A CPU worker leaves the flag as it was (torch's default, off): CPU training is unchanged.
    ("cpu", True, False),
])
def test_a_training_worker_benchmarks_cudnn_on_gpus_only(monkeypatch, device, setting, expected):
    from types import SimpleNamespace

    import ray.train
    import ray.train.torch

    from uml.train.worker import configure_worker

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)  # restored after the test
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    monkeypatch.setattr(ray.train, "get_context", lambda: SimpleNamespace(get_world_rank=lambda: 0, get_world_size=lambda: 1))
    monkeypatch.setattr(ray.train.torch, "get_device", lambda: torch.device(device, 0) if device == "cuda" else torch.device(device))
    rank, world, got = configure_worker(parse_params({"train": {"cudnn_benchmark": setting}}))
    assert (rank, world, got.type) == (0, 1, device)
    assert torch.backends.cudnn.benchmark is expected


@pytest.mark.parametrize("address", [None, "127.0.0.1:6379"])
def test_the_runtime_env_carries_the_drivers_nccl_settings_and_ray_trains_local_settings(monkeypatch, address):
    """What ray_session hands ray.init: the workers of a joined cluster get the driver's NCCL_*
    variables only this way (tests/train/test_cluster.py runs it on a real two-node cluster), and
    a local instance's Ray Train gets the settings of uml.train.cluster.LOCAL_TRAIN_ENV
    (tests/train/test_ray_training.py checks their effect on a real run)."""
    import ray

    from uml.train import cluster

    class Captured(Exception):
        pass

    seen = {}

    def fake_init(**kwargs):
        seen.update(kwargs)
        raise Captured

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fake_init)
    monkeypatch.setenv("NCCL_DEBUG", "INFO")
    monkeypatch.setenv("NCCL_IB_HCA", "mlx5_0")
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "eth7")
    monkeypatch.setenv("NOT_NCCL_X", "1")
    with pytest.raises(Captured), cluster.ray_session(parse_params({"ray": {"address": address}})):
        pass
    env = seen["runtime_env"]["env_vars"]
    assert env["NCCL_DEBUG"] == "INFO" and env["NCCL_IB_HCA"] == "mlx5_0" and "NOT_NCCL_X" not in env
    # A local instance binds the collective sockets to ray.host's interface whatever the driver
    # says; on a joined cluster the driver's choice goes through.
    assert env["NCCL_SOCKET_IFNAME"] == ("eth7" if address else cluster.collective_socket_env("127.0.0.1")["NCCL_SOCKET_IFNAME"])
    # Ray Train's settings for one machine: only a local instance gets them (a cluster keeps Ray's
    # defaults), and a value the user set in the environment wins.
    if address:
        assert "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER" not in env and "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S" not in env
    else:
        assert env["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0" and env["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "0.5"
        monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "3")
        with pytest.raises(Captured), cluster.ray_session(parse_params({"ray": {"address": address}})):
            pass
        assert seen["runtime_env"]["env_vars"]["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "3"


# ------------------------------------------------------------------- ray.storage_path trust
def _storage_params(storage):
    return Params().with_overrides({"data.root": str(storage.parent / "data"), "ray.storage_path": str(storage)})


def test_a_storage_folder_others_can_write_to_is_refused(tmp_path):
    import os

    from uml.train.cluster import check_storage_trust

    storage = tmp_path / "ray"
    check_storage_trust(_storage_params(storage))  # missing: created private
    assert storage.is_dir() and oct(storage.stat().st_mode & 0o777) == oct(0o700)
    for mode, who in ((0o777, "everyone"), (0o775, "its group")):
        storage.chmod(mode)
        with pytest.raises(ClusterError, match=rf"ray.storage_path {storage} is not safe to use: {storage} is writable by "
                                               rf"{who} \(mode {mode:o}\)\. Resuming a run unpickles .* Fix: chmod -R go-w {storage}"):
            check_storage_trust(_storage_params(storage))
    storage.chmod(0o755)
    check_storage_trust(_storage_params(storage))
    check_storage_trust(Params().with_overrides({"ray.storage_path": "s3://bucket/uml"}))  # the bucket's policy decides
    if os.geteuid() == 0:  # only root can give a folder away
        os.chown(storage, 12345, 12345)
        with pytest.raises(ClusterError, match=rf"{storage} is owned by another user \(uid 12345\)"):
            check_storage_trust(_storage_params(storage))
        os.chown(storage, 0, 0)


def test_a_storage_folder_inside_a_folder_anyone_can_write_to_is_refused(tmp_path):
    from uml.train.cluster import check_storage_trust

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(ClusterError, match=rf"the folder above it, {shared}, is writable by everyone .*chmod o-w {shared}"):
        check_storage_trust(_storage_params(shared / "ray"))
    shared.chmod(0o1777)  # sticky, as /tmp: nobody can replace another user's folder
    check_storage_trust(_storage_params(shared / "ray"))


def test_a_sweep_to_be_restored_must_not_be_writable_by_others(tmp_path):
    from uml.train.cluster import check_storage_trust

    storage = tmp_path / "ray"
    experiment = storage / "tune-abc"
    experiment.mkdir(parents=True)
    (experiment / "tuner.pkl").write_bytes(b"pickle")
    (experiment / "tuner.pkl").chmod(0o664)
    storage.chmod(0o755)  # others can reach the experiment folder
    with pytest.raises(ClusterError, match=rf"{experiment / 'tuner.pkl'} is writable by its group"):
        check_storage_trust(_storage_params(storage), experiment)
    storage.chmod(0o700)  # nobody else gets in: what is inside cannot be reached
    check_storage_trust(_storage_params(storage), experiment)


@pytest.mark.parametrize("stage", ["train", "tune"])
def test_stages_check_the_storage_before_starting_anything(tmp_path, stage):
    import ray

    from uml.config import load_params
    from uml.data.prepare import prepare
    from uml.train.sweep import sweep
    from uml.train.trainer import train

    from tests.train.tiny import write_tiny_params

    storage = tmp_path / "ray"
    storage.mkdir(mode=0o777)
    storage.chmod(0o777)
    params = load_params(write_tiny_params(tmp_path, ray={"storage_path": str(storage)}, train={"use_tuned": False}))
    prepare(params)
    with pytest.raises(ClusterError, match=f"ray.storage_path {storage} is not safe to use"):
        (train if stage == "train" else sweep)(params)
    assert not ray.is_initialized() and list(storage.iterdir()) == []


@pytest.mark.parametrize(("flags", "native"), [
    ("fpu sse2 avx2 avx512f avx512bw avx512_vnni", False),  # AVX-512 alone: oneDNN emulates bf16
    ("fpu avx512f avx512_bf16 avx512_vnni", True),  # e.g. AMD Zen 4, Intel Cooper Lake
    ("fpu avx512f amx_bf16 amx_tile", True),  # Intel Sapphire Rapids
])
def test_native_bf16_is_read_from_the_cpu_flags(tmp_path, flags, native):
    from uml.train.worker import cpu_has_native_bf16

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    assert cpu_has_native_bf16(cpuinfo) is native
    assert cpu_has_native_bf16(tmp_path / "missing") is False
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n")
    assert cpu_has_native_bf16(arm) is True


@pytest.mark.parametrize(("device", "precision", "native", "expected"), [
    ("cpu", "bf16", True, torch.bfloat16),
    ("cpu", "bf16", False, None),
    ("cpu", "fp16", True, None),
    ("cpu", "fp32", True, None),
    ("cuda", "bf16", False, torch.bfloat16),
    ("cuda", "fp16", False, torch.float16),
    ("cuda", "fp32", False, None),
])
def test_autocast_dtype_per_device_and_precision(monkeypatch, device, precision, native, expected):
    from uml.train import worker

    monkeypatch.setattr(worker, "cpu_has_native_bf16", lambda: native)
    assert worker.autocast_dtype(torch.device(device), precision) is expected


def test_the_training_and_sweep_plots_leave_pyplot_alone(tmp_path):
    """plot_progress (train) and plot_scores (tune) draw on Figures of their own, as uml.plots:
    in a fresh process, pyplot is never imported and both PNGs are written."""
    import subprocess
    import sys

    script = """
import sys
from pathlib import Path
import pandas as pd
from uml.train.live import plot_progress
from uml.train.sweep import plot_scores
out = Path(sys.argv[1])
plot_progress([{"epoch": e, "train/loss": 1.0 / (e + 1), "val/cls/acc": 0.5, "val/score": 0.4 + e / 20} for e in range(3)],
              out / "progress.png")
table = pd.DataFrame({"trial_id": ["a", "b"], "loss.cls_weight": [0.5, 0.3], "score": [0.6, 0.7],
                      "baseline": [True, False], "status": ["completed", "stopped early"]})
plot_scores(table, ["loss.cls_weight"], out / "scores.png", chosen="b")
print("pyplot imported:", "matplotlib.pyplot" in sys.modules)
"""
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, check=True)
    assert "pyplot imported: False" in done.stdout
    for name in ("progress.png", "scores.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_trial_runs_tune_steps_per_epoch_steps_with_its_sampled_values():
    from uml.train.sweep import trial_params

    base = parse_params({"train": {"steps_per_epoch": 75}, "tune": {"steps_per_epoch": 30}}).model_dump()
    params = trial_params({"loss.cls_weight": 0.25}, base)
    assert params.train.steps_per_epoch == 30 and params.loss.cls_weight == 0.25
    base["tune"]["steps_per_epoch"] = None  # the training epoch, as the published recipe runs it
    assert trial_params({}, base).train.steps_per_epoch == 75
    base["train"]["steps_per_epoch"] = None
    assert trial_params({}, base).train.steps_per_epoch is None


def test_ray_side_processes_do_not_import_the_training_loop():
    # Ray imports these modules in a sweep trial's driver (sweep, trainer) and in Ray Train's
    # controller (live, through LiveLogger), each starting on the cores the workers train on:
    # the model (timm, torchvision), the metrics (scikit-learn) and the augmentation belong to
    # the worker processes alone, which reach them through uml.train.entry.worker_entry.
    import subprocess
    import sys

    heavy = ["timm", "torchvision", "sklearn", "albumentations", "uml.train.worker", "uml.models.uml_net"]
    code = f"import sys, uml.train.sweep, uml.train.live, uml.train.trainer; print(' '.join(m for m in {heavy!r} if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert loaded == []


def test_the_worker_entry_runs_the_training_loop_and_imports_nothing_else(monkeypatch):
    import subprocess
    import sys

    import uml.train.worker
    from uml.train.entry import worker_entry

    seen = []
    monkeypatch.setattr(uml.train.worker, "train_loop_per_worker", seen.append)
    worker_entry({"epochs": 3})
    assert seen == [{"epochs": 3}]
    # What a worker imports to unpickle the function: no torch, no Ray, nothing of uml beyond it.
    code = "import sys, uml.train.entry; print(' '.join(sorted(m for m in sys.modules if m.startswith(('uml', 'torch', 'ray')))))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert loaded == ["uml", "uml.train", "uml.train.entry"]
