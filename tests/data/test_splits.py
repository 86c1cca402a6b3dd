"""Splits a data set defines itself: REFUGE's challenge folders, a folder source's split column,
``data.split.method``, and bad split input (an error naming the file, nothing written)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.data.helpers import leftovers, make_folder, make_refuge_challenge, make_refuge_training400, params_for, store_path
from uml.config import SplitParams
from uml.data.prepare import prepare
from uml.data.records import GivenSplit
from uml.data.store import SPLIT_NAMES, given_split_indices, open_prepared
from uml.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[2]
# The challenge in miniature: Training 3 glaucoma + 5 not, Validation 4 + 8, Test 2 + 4.
TRAINING = {f"g{i:04d}": 1 for i in range(1, 4)} | {f"n{i:04d}": 0 for i in range(1, 6)}
VALIDATION = {f"V{i:04d}": int(i % 3 == 0) for i in range(1, 13)}
TEST = {f"T{i:04d}": int(i % 3 == 0) for i in range(1, 7)}


def _splits(data) -> dict[str, set[str]]:
    ids = data.ids
    return {name: {ids[i] for i in data.split(name)} for name in SPLIT_NAMES}


@pytest.fixture
def challenge(tmp_path: Path) -> Path:
    root = tmp_path / "REFUGE"
    make_refuge_challenge(root, TRAINING, VALIDATION, TEST)
    return root


def test_refuge_prepares_with_the_official_split_by_default(tmp_path: Path, challenge: Path) -> None:
    data = open_prepared(prepare(params_for(tmp_path, source="refuge", path=str(challenge))))
    splits = _splits(data)
    assert splits["train"] == set(TRAINING) and splits["test"] == set(TEST)
    # Validation (12 images) is divided in the ratio val : calib = 0.07 : 0.25: 12 * 0.07 / 0.32 = 2.6 -> 3.
    assert splits["val"] | splits["calib"] == set(VALIDATION) and not splits["val"] & splits["calib"]
    assert (len(splits["val"]), len(splits["calib"])) == (3, 9)
    assert sum(VALIDATION[i] for i in splits["val"]) == 1  # stratified: a third of Validation is glaucoma
    assert data.attrs["split_method"] == "given"
    assert "Training set is train" in data.attrs["split_description"]
    assert "drawn from its Validation set" in data.attrs["split_description"]
    assert data.attrs["split_sizes"] == {"train": 8, "val": 3, "test": 6, "calib": 9}
    # Seeded: the same seed draws the same val, another seed another one; train and test never move.
    again = _splits(open_prepared(prepare(params_for(tmp_path / "again", source="refuge", path=str(challenge)))))
    assert again == splits
    reseeded = _splits(open_prepared(prepare(params_for(tmp_path / "seed1", source="refuge", path=str(challenge), seed=1))))
    assert reseeded["train"] == splits["train"] and reseeded["test"] == splits["test"]
    assert reseeded["val"] != splits["val"]


def test_random_method_ignores_the_official_split(tmp_path: Path, challenge: Path) -> None:
    data = open_prepared(prepare(params_for(tmp_path, source="refuge", path=str(challenge), split={"method": "random"})))
    # 26 images: val 26 * 0.07 = 1.8 -> 2, test and calib 26 * 0.25 = 6.5 -> 7 each, train the rest.
    assert data.attrs["split_sizes"] == {"train": 10, "val": 2, "test": 7, "calib": 7}
    assert data.attrs["split_method"] == "random" and data.attrs["split_description"].startswith("random: stratified")
    assert _splits(data)["train"] != set(TRAINING)


def test_refuge_without_all_three_parts_splits_at_random_unless_given_is_asked(tmp_path: Path) -> None:
    root = tmp_path / "REFUGE"
    make_refuge_training400(root, TRAINING | {f"n{i:04d}": 0 for i in range(6, 14)})
    auto = open_prepared(prepare(params_for(tmp_path, source="refuge", path=str(root))))
    assert auto.attrs["split_method"] == "random"
    with pytest.raises(ConfigError, match=r"data\.split\.method: 'given', but the refuge data set defines no split: the "
                                          r"challenge's Training, Validation and Test folders are not all present "
                                          r"\(found: Training\)"):
        prepare(params_for(tmp_path / "given", source="refuge", path=str(root), split={"method": "given"}))
    assert leftovers(tmp_path / "given") == []


def test_an_image_in_two_challenge_parts_stops_prepare(tmp_path: Path, challenge: Path) -> None:
    twin = challenge / "REFUGE-Test400" / "Test400" / "g0001.png"
    shutil.copy(challenge / "REFUGE-Training400" / "Training400" / "Glaucoma" / "g0001.png", twin)
    with open(challenge / "REFUGE-Test-GT" / "Glaucoma_label.csv", "a") as fh:
        fh.write("g0001.jpg,1\n")
    with pytest.raises(DataError, match=r"image 'g0001' is in two splits: Training \(.*Glaucoma/g0001\.png\) and "
                                        r"Test \(.*Test400/g0001\.png\)"):
        prepare(params_for(tmp_path, source="refuge", path=str(challenge)))
    assert leftovers(tmp_path) == []


def _folder(root: Path, splits: list[str], header: str = "id,label,split") -> dict[str, str]:
    labels = {f"i{k:02d}": str(k % 2) for k in range(len(splits))}
    make_folder(root, labels, size=(32, 32))
    rows = [header] + [f"{k},{v},{s}" for (k, v), s in zip(labels.items(), splits, strict=True)]
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return dict(zip(labels, splits, strict=True))


SPLITS = ["train"] * 6 + ["val"] * 2 + ["test"] * 2 + ["calib"] * 2


def test_the_folder_split_column_is_the_split(tmp_path: Path) -> None:
    # Split names in any case; the column may come anywhere after id,label and be spelt Split.
    given = _folder(tmp_path / "raw", [s.capitalize() if i % 2 else s for i, s in enumerate(SPLITS)],
                    header="id,label,Split")
    data = open_prepared(prepare(params_for(tmp_path, source="folder", path=str(tmp_path / "raw"))))
    assert _splits(data) == {name: {k for k, v in given.items() if v.lower() == name} for name in SPLIT_NAMES}
    assert data.attrs["split_method"] == "given" and "split column of" in data.attrs["split_description"]
    # random: the column is not used; the shares decide (12 * 0.07 = 0.8 -> 1 val, 3 test, 3 calib).
    rand = open_prepared(prepare(params_for(tmp_path / "r", source="folder", path=str(tmp_path / "raw"),
                                            split={"method": "random"})))
    assert rand.attrs["split_sizes"] == {"train": 5, "val": 1, "test": 3, "calib": 3}
    assert rand.content_hash != data.content_hash


@pytest.mark.parametrize(("edit", "message"), [
    (lambda rows: rows[:3] + [rows[3].replace(",val", ",validation")] + rows[4:],
     r"labels\.csv:4: unknown split 'validation' for 'i02'; use one of train, val, test, calib"),
    (lambda rows: rows[:3] + [rows[3].replace(",val", ",")] + rows[4:],
     r"labels\.csv:4: no split for 'i02'; the split column needs one of train, val, test, calib in every row"),
    (lambda rows: rows + ["i00,0,test"],
     r"labels\.csv:14: image 'i00' is in two splits: 'train' \(line 2\) and 'test' \(line 14\)"),
    (lambda rows: [r.replace(",calib", ",train") for r in rows],
     r"labels\.csv: the split column leaves split\(s\) \['calib'\] empty \(train 8, val 2, test 2, calib 0\)"),
])
def test_bad_split_input_stops_prepare_naming_the_file_and_writes_nothing(tmp_path: Path, edit, message) -> None:
    # The rows: header, then i00..i11 (lines 2..13); i02 is the first val image.
    _folder(tmp_path / "raw", ["train", "train", "val", "val"] + SPLITS[4:6] + SPLITS[8:] + ["train", "train"])
    csv = tmp_path / "raw" / "labels.csv"
    rows = csv.read_text().splitlines()
    assert rows[3] == "i02,0,val"
    csv.write_text("\n".join(edit(rows)) + "\n")
    with pytest.raises(DataError, match=message):
        prepare(params_for(tmp_path, source="folder", path=str(tmp_path / "raw")))
    assert leftovers(tmp_path) == []


def test_given_without_a_split_column_is_a_config_error(tmp_path: Path) -> None:
    make_folder(tmp_path / "raw", {f"i{k:02d}": str(k % 2) for k in range(12)}, size=(32, 32))
    with pytest.raises(ConfigError, match=r"data\.split\.method: 'given', but the folder data set defines no split: "
                                          r".*labels\.csv has no split column"):
        prepare(params_for(tmp_path, source="folder", path=str(tmp_path / "raw"), split={"method": "given"}))
    assert leftovers(tmp_path) == []


def test_bad_split_input_exits_nonzero_from_the_command_line(tmp_path: Path) -> None:
    _folder(tmp_path / "raw", SPLITS[:-1] + ["Calibration"])
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"data": {"source": "folder", "path": str(tmp_path / "raw"),
                                               "root": str(tmp_path / "out"), "image_size": 32}}))
    proc = subprocess.run([sys.executable, "-m", "pipeline.prepare", "--params", str(params)], cwd=REPO,
                          env=os.environ | {"NO_ALBUMENTATIONS_UPDATE": "1"}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "prepare: error:" in proc.stderr and "labels.csv:13: unknown split 'Calibration' for 'i11'" in proc.stderr
    assert "Traceback" not in proc.stderr and not store_path(tmp_path).exists()


def test_given_split_indices_assign_and_divide_pools() -> None:
    ids = [f"x{i}" for i in range(10)]
    labels = np.array([0, 1] * 5)
    given = GivenSplit({**{i: "train" for i in ids[:3]}, "x3": "test", **{i: "pool" for i in ids[4:]}}, "a test split",
                       pools={"pool": ("val", "calib")})
    split = SplitParams(val=0.1, test=0.2, calib=0.2)
    got = given_split_indices(ids, labels, given, split, seed=0)
    assert got["train"].tolist() == [0, 1, 2] and got["test"].tolist() == [3]
    # The pool's 6 images in the ratio 0.1 : 0.2: 2 val, 4 calib; one of each class in val (stratified).
    assert len(got["val"]) == 2 and len(got["calib"]) == 4 and sorted(labels[got["val"]].tolist()) == [0, 1]
    assert sorted(np.concatenate([got["val"], got["calib"]]).tolist()) == list(range(4, 10))
    with pytest.raises(DataError, match=r"1 image\(s\) have no split in the given split \(e\.g\. \['x9'\]\)"):
        given_split_indices(ids, labels, GivenSplit({k: v for k, v in given.assignment.items() if k != "x9"}, "d",
                                                    pools=given.pools), split, seed=0)
    with pytest.raises(DataError, match=r"image 'x3' is assigned to the unknown split 'tset'"):
        given_split_indices(ids, labels, GivenSplit({**given.assignment, "x3": "tset"}, "d", pools=given.pools),
                            split, seed=0)
    with pytest.raises(DataError, match=r"leaves split\(s\) \['test'\] empty"):
        given_split_indices(ids, labels, GivenSplit({**given.assignment, "x3": "train"}, "d", pools=given.pools),
                            split, seed=0)
