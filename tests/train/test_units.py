"""Training pieces that need no Ray cluster: LR schedule, sharding, storage check, search space,
tuned params, run names."""

import numpy as np
import pytest
import torch
import yaml
from torch.utils.data import DistributedSampler

from uml.config import Params, Paths
from uml.errors import ClusterError, ConfigError
from uml.train.cluster import check_storage
from uml.train.schedule import ConstantThenPoly, build_scheduler
from uml.train.sweep import build_search_space
from uml.train.trainer import effective_params, flatten, run_name
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


def test_multi_node_local_storage_is_refused(tmp_path):
    params = Params().with_overrides({"data.root": str(tmp_path / "data")})
    check_storage(params, num_nodes=1)  # single node: anything goes
    with pytest.raises(ClusterError, match="shared storage") as err:
        check_storage(params, num_nodes=3)
    assert "NFS" in str(err.value) and "s3://" in str(err.value)
    check_storage(params.with_overrides({"ray.storage_path": "s3://bucket/uml"}), num_nodes=3)
    check_storage(params.with_overrides({"ray.shared_storage": True}), num_nodes=3)


def test_search_space_is_validated():
    assert set(build_search_space(Params())) == {"loss.cls_weight", "loss.seg_weight", "loss.mut_weight", "loss.kl_annealing_epochs"}
    cases = [
        ({"loss.nope": {"uniform": [0, 1]}}, "not a params key"),
        ({"loss.cls_weight": {"gaussian": [0, 1]}}, "unknown distribution"),
        ({"loss.cls_weight": {"uniform": [0.9, 0.1]}}, "low < high"),
        ({"loss.mut_weight": {"loguniform": [0, 1]}}, "low > 0"),
        ({"loss.kl_annealing_epochs": {"randint": [0, 5]}}, "invalid value 0"),
        ({"loss.cls_weight": {"uniform": [-1, 1]}}, "invalid value -1"),
        ({"loss.cls_weight": [0.1, 0.2]}, "one distribution"),
        ({"ray.num_workers": {"choice": [1, 2]}}, "cannot be searched"),
        ({}, "empty"),
    ]
    for space, message in cases:
        params = Params().model_copy(update={"tune": Params().tune.model_copy(update={"search_space": space})})
        with pytest.raises(ConfigError, match=message):
            build_search_space(params)


def test_tuned_params_replace_the_loss_defaults(tmp_path):
    params = Params().with_overrides({"data.root": str(tmp_path)})
    assert effective_params(params) == (params, {})  # no sweep yet: params as they are
    Paths(params).tune_dir.mkdir(parents=True)
    Paths(params).best_params.write_text(yaml.safe_dump({"loss": {"cls_weight": 0.123, "kl_annealing_epochs": 3}}))
    tuned, applied = effective_params(params)
    assert applied == {"loss.cls_weight": 0.123, "loss.kl_annealing_epochs": 3}
    assert tuned.loss.cls_weight == 0.123 and tuned.loss.kl_annealing_epochs == 3 and tuned.loss.seg_weight == params.loss.seg_weight
    off, applied = effective_params(params.with_overrides({"train.use_tuned": False}))
    assert applied == {} and off.loss.cls_weight == params.loss.cls_weight
    Paths(params).best_params.write_text(yaml.safe_dump({"loss": {"cls_weight": -3}}))
    with pytest.raises(ConfigError, match="cls_weight"):
        effective_params(params)


def test_run_name_is_deterministic_and_tracks_what_matters():
    params = Params()
    assert run_name(params, "abc") == run_name(Params(), "abc")
    assert run_name(params, "abc") != run_name(params, "abd")  # other data
    assert run_name(params, "abc") != run_name(params.with_overrides({"loss.cls_weight": 0.3}), "abc")
    assert run_name(params, "abc") != run_name(params.with_overrides({"ray.num_workers": 3}), "abc")
    assert run_name(params, "abc") == run_name(params.with_overrides({"train.loader_workers": 4}), "abc")


def test_flatten_nested_params():
    assert flatten({"loss": {"cls_weight": 0.3, "x": {"y": 1}}}) == {"loss.cls_weight": 0.3, "loss.x.y": 1}


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
    monkeypatch.setattr(trainer, "alive_nodes", lambda: 1)
    params = parse_params({"data": {"root": str(tmp_path), "mask_values": {0: 0, 128: 1, 255: 2}}})
    with pytest.raises(RuntimeError, match="captured"):
        trainer.run_trainer(params, name="x", model_cfg=SimpleNamespace(to_dict=dict), epochs=1)
    assert parse_params(shipped["params"], source="train config").model_dump() == params.model_dump()
