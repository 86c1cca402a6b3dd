"""uml.config: strict types, unreadable params files, and the warning for a reachable ray.host."""

from __future__ import annotations

import logging
import shlex
from pathlib import Path

import pytest
import yaml

from tests.committed import NotACheckout, committed_text
from uml.config import Params, is_loopback_host, load_params, parse_params
from uml.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("train", "epochs", True, r"train\.epochs: Input should be a valid integer \(got True\)"),
        ("train", "epochs", "5", r"train\.epochs: Input should be a valid integer \(got '5'\); quoted values are text"),
        ("train", "use_tuned", "yes", r"train\.use_tuned: Input should be a valid boolean \(got 'yes'\)"),
        ("train", "use_tuned", 1, r"train\.use_tuned: Input should be a valid boolean \(got 1\)"),
        ("train", "lr", "1e-4", r"train\.lr: .*YAML reads 1e-4 as text: write 1\.0e-4"),
        ("loss", "cls_weight", "0.5", r"loss\.cls_weight: Input should be a valid number"),
        ("tune", "num_samples", 4.0, r"tune\.num_samples: Input should be a valid integer"),
        ("ray", "host", 127, r"ray\.host: Input should be a valid string"),
    ],
)
def test_wrong_types_are_rejected_not_coerced(section, key, value, message):
    with pytest.raises(ConfigError, match=message):
        parse_params({section: {key: value}}, source="p.yaml")


def test_int_for_float_lists_and_mappings_still_validate():
    params = parse_params({
        "loss": {"cls_weight": 1, "seg_weight": 0},  # ints where floats are declared
        "tune": {"reduction_factor": 3, "search_space": {"loss.cls_weight": {"uniform": [0, 1]}}},
        "ray": {"resources_per_worker": {"CPU": 2}},
        "data": {"mask_values": {0: 0, 128: 1, 255: 2}, "mask_classes": ["bg", "disc", "cup"],
                 "split": {"val": 0.1, "test": 0.2}},
        "evaluate": {"gaussian_sigmas": [1, 0.5]},
    })
    assert params.loss.cls_weight == 1.0 and isinstance(params.loss.cls_weight, float)
    assert params.tune.reduction_factor == 3.0 and params.ray.resources_per_worker == {"CPU": 2.0}
    assert params.data.mask_values == {0: 0, 128: 1, 255: 2} and params.evaluate.gaussian_sigmas == [1.0, 0.5]
    # What with_overrides and the Ray workers go through: a dump validates again.
    assert parse_params(params.model_dump()) == params


def _leaves(tree, prefix=""):
    """Dotted key -> value for every leaf of a nested mapping (search-space entries kept whole)."""
    out = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value and dotted not in ("tune.search_space", "ray.resources_per_worker"):
            out.update(_leaves(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def test_params_yaml_lists_every_key_with_exactly_the_schema_default():
    # One source of defaults: params.yaml as committed is the schema's defaults written out in
    # full (DVC reads every tracked key from it). A default changed in one and not the other fails
    # here by key. The working copy is the user's to change (dvc exp run -S, uml params --out):
    # it is not what this checks.
    try:
        committed = committed_text("params.yaml")
    except NotACheckout as exc:
        pytest.fail(str(exc), pytrace=False)
    shipped = _leaves(yaml.safe_load(committed))
    defaults = _leaves(Params().model_dump())
    assert sorted(shipped) == sorted(defaults)
    differing = {k: (shipped[k], defaults[k]) for k in defaults if shipped[k] != defaults[k]}
    assert not differing, differing
    assert shipped["train.epochs"] == 10 and shipped["data.image_size"] == 128  # the CPU default run


def test_the_published_recipe_file_holds_only_what_differs():
    # configs/paper-gpu.yaml is an overrides file, not a third full copy: each key it sets
    # changes the default; the keys it leaves out are the schema's.
    raw = yaml.safe_load((REPO / "configs" / "paper-gpu.yaml").read_text())
    overrides, defaults = _leaves(raw), _leaves(Params().model_dump())
    unknown = set(overrides) - set(defaults)
    assert not unknown, unknown
    same = {k: v for k, v in overrides.items() if v == defaults[k]}
    assert not same, f"configs/paper-gpu.yaml repeats defaults: {same}"
    params = load_params(REPO / "configs" / "paper-gpu.yaml")
    assert params.train.weight_decay == 1e-5 and params.loss.mut_weight == 0.1  # left out: published = default
    assert params.data.image_size == 256 and params.train.epochs == 100


def test_uml_params_writes_the_full_file_dvc_reads(tmp_path, capsys):
    from uml.cli import main

    partial = tmp_path / "partial.yaml"
    partial.write_text("train:\n  epochs: 3\ndata:\n  mask_values: {0: 0, 128: 1, 255: 2}\n")
    out = tmp_path / "params.yaml"
    assert main(["params", str(partial), "--out", str(out)]) == 0
    written = yaml.safe_load(out.read_text())
    assert written["train"]["epochs"] == 3 and written["train"]["lr"] == Params().train.lr
    assert written["data"]["mask_values"] == {0: 0, 128: 1, 255: 2}  # integer keys stay integers
    assert {k: sorted(v) for k, v in written.items()} == {k: sorted(v) for k, v in Params().model_dump().items()}
    assert load_params(out).model_dump() == load_params(partial).model_dump()
    # An invalid file: exit 1 naming the key, and the existing output untouched.
    before = out.read_bytes()
    partial.write_text("train:\n  epochs: 0\n")
    assert main(["params", str(partial), "--out", str(out)]) == 1
    assert "train.epochs" in capsys.readouterr().err and out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_uml_params_dvc_set_prints_the_dvc_exp_run_arguments_of_a_recipe(tmp_path, capsys):
    from dvc.utils.hydra import apply_overrides  # what `dvc exp run -S` runs on params.yaml

    from uml.cli import main

    recipe = REPO / "configs" / "paper-gpu.yaml"
    assert main(["params", str(recipe), "--dvc-set"]) == 0
    args = shlex.split(capsys.readouterr().out)  # as the shell reads them (eval, or pasted)
    assert args[0::2] == ["-S"] * (len(args) // 2) and "train.epochs=100" in args[1::2]
    # Applied by DVC to the committed defaults, they give exactly the recipe.
    target = tmp_path / "params.yaml"
    target.write_text(committed_text("params.yaml"))
    apply_overrides(target, args[1::2])
    assert load_params(target).model_dump() == load_params(recipe).model_dump()


def test_dvc_set_overrides_carry_any_value_or_refuse(tmp_path):
    from dvc.utils.hydra import apply_overrides

    from uml.config import dump_params, dvc_set_overrides

    tricky = Params().with_overrides({
        "data.path": "/mnt/my data/it's", "data.class_names": ["true", "1.5", "a b"], "data.mask_values": {0: 0, 255: 2},
        "model.cls_weights": "C:\\weights\\res2net.pt\\", "model.seg_weights": "a\\'b", "train.lr": 2.5e-05,
        "train.steps_per_epoch": None, "ray.resources_per_worker": {"GPU": 1},
        "tune.search_space": {"model.dropout": {"choice": [0.0, 0.1]}},
    })
    overrides = dvc_set_overrides(tricky)
    # A mapping is replaced, not merged: the default search space's keys do not survive.
    assert overrides[overrides.index("~tune.search_space") + 1] == "+tune.search_space={model.dropout: {choice: [0.0, 0.1]}}"
    target = tmp_path / "params.yaml"
    target.write_text(dump_params(Params()))
    apply_overrides(target, overrides)
    assert load_params(target).model_dump() == tricky.model_dump()
    assert dvc_set_overrides(Params()) == []
    with pytest.raises(ConfigError, match=r"ray\.resources_per_worker: the mapping key 'node:10\.0\.0\.5' cannot be written"):
        dvc_set_overrides(Params().with_overrides({"ray.resources_per_worker": {"CPU": 1, "node:10.0.0.5": 1}}))


def test_a_params_file_that_is_not_utf8_names_the_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_bytes("train:\n  epochs: 3  # caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=rf"{path}: not UTF-8 text \(byte 25: b'\\xe9'\)"):
        load_params(path)


@pytest.mark.parametrize("text", ["- data\n- model\n", "just a string\n", "42\n"])
def test_a_params_file_whose_top_level_is_not_a_mapping_names_the_file(tmp_path, text):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"{path}: the top level must be a mapping of sections"):
        load_params(path)


def test_invalid_yaml_names_the_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train: {epochs: [\n")
    with pytest.raises(ConfigError, match=rf"{path}: not valid YAML"):
        load_params(path)


@pytest.mark.parametrize(("host", "loopback"), [("127.0.0.1", True), ("127.0.0.2", True), ("::1", True),
                                                  ("localhost", True), ("0.0.0.0", False), ("::", False),
                                                  ("::ffff:127.0.0.1", True), ("::ffff:10.0.0.5", False),
                                                  ("10.0.0.5", False), ("myhost", False)])
def test_loopback_hosts(host, loopback):
    assert is_loopback_host(host) is loopback


def test_a_reachable_ray_host_warns_once_naming_what_listens(caplog):
    with caplog.at_level(logging.WARNING, logger="uml.config"):
        parse_params({"ray": {"host": "127.0.0.1"}})
        assert caplog.text == ""
        params = parse_params({"ray": {"host": "192.0.2.7"}})
        params.with_overrides({"loss.cls_weight": 0.3})  # validated again: no second warning
    assert caplog.text.count("ray.host is 192.0.2.7, not a loopback address") == 1
    for what in ("GCS", "dashboard", "8265", "DDP rendezvous store", "gloo"):
        assert what in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="uml.config"):
        parse_params({"ray": {"host": "192.0.2.8", "address": "ray://head:10001"}})  # a cluster: host unused
    assert caplog.text == ""


def test_defaults_are_valid():
    assert Params().train.use_tuned is True
