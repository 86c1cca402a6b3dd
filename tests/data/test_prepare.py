"""The prepare stage end to end: sources, determinism, and every bad-input case (DataError, no store)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.data.helpers import leftovers, make_folder, make_refuge_training400, params_for, rgb, save, store_path
from uml.data.prepare import prepare
from uml.data.store import compute_content_hash, open_prepared
from uml.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[2]
SYNTH = {"num_images": 24, "render_size": 64}


def test_synthetic_prepare_is_deterministic(tmp_path: Path) -> None:
    out = prepare(params_for(tmp_path / "a", synthetic=SYNTH))
    assert out == store_path(tmp_path / "a")
    data = open_prepared(out)
    assert (data.num_images, data.image_size, data.attrs["source"]) == (24, 32, "synthetic")
    assert data.attrs["source_info"]["synthetic"]["render_size"] == 64
    assert data.class_names == ["non-glaucoma", "glaucoma"] and data.mask_classes == ["background", "disc", "cup"]
    assert data.class_names[data.positive_class] == "glaucoma"  # the source declares it; the store records it
    again = open_prepared(prepare(params_for(tmp_path / "b", synthetic=SYNTH)))
    assert again.content_hash == data.content_hash == compute_content_hash(data)
    rerun = open_prepared(prepare(params_for(tmp_path / "a", synthetic=SYNTH)))  # over an existing store
    assert rerun.content_hash == data.content_hash and [p.name for p in leftovers(tmp_path / "a")] == ["dataset.zarr"]
    other = open_prepared(prepare(params_for(tmp_path / "c", seed=1, synthetic=SYNTH)))
    assert other.content_hash != data.content_hash


def test_folder_prepare(tmp_path: Path) -> None:
    labels = {f"img{i:02d}": ("sick" if i % 3 == 0 else "well") for i in range(12)}
    written = make_folder(tmp_path / "raw", labels, size=(32, 32))
    data = open_prepared(prepare(params_for(tmp_path, source="folder", path=str(tmp_path / "raw"), positive_class="sick")))
    assert data.class_names == ["sick", "well"] and data.attrs["source"] == "folder"
    assert data.positive_class == 0  # declared by data.positive_class, not the last in sorted order
    assert data.ids == sorted(labels)
    for i, item_id in enumerate(data.ids):
        assert np.array_equal(data.images[i], written[item_id][0])
        assert np.array_equal(data.masks[i], written[item_id][1])
        assert int(data.labels[i]) == (0 if labels[item_id] == "sick" else 1)


def test_refuge_prepare(tmp_path: Path) -> None:
    ids = {f"g{i:04d}": 1 for i in range(3)} | {f"n{i:04d}": 0 for i in range(7)}
    make_refuge_training400(tmp_path / "refuge", ids)
    data = open_prepared(prepare(params_for(tmp_path, source="refuge", path=str(tmp_path / "refuge"))))
    assert data.attrs["fingerprint"]["class_counts"] == {"non-glaucoma": 7, "glaucoma": 3}
    assert set(np.unique(data.masks[:]).tolist()) == {0, 1, 2}


def test_synthetic_requires_fundus_mask_classes(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="mask_classes"):
        prepare(params_for(tmp_path, mask_classes=["bg", "fg"], synthetic=SYNTH))


# ------------------------------------------------------------------------- bad inputs
LABELS = {k: ("a" if i % 2 else "b") for i, k in enumerate("abcdef")}


def _prepare_bad(tmp_path: Path, **data: object) -> str:
    data.setdefault("positive_class", "b")  # LABELS' text labels: the positive one must be named
    with pytest.raises(DataError) as err:
        prepare(params_for(tmp_path, source="folder", path=str(tmp_path / "raw"), **data))
    assert not store_path(tmp_path).exists() and leftovers(tmp_path) == []
    return str(err.value)


def test_corrupt_image(tmp_path: Path) -> None:
    make_folder(tmp_path / "raw", LABELS)
    (tmp_path / "raw" / "images" / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    msg = _prepare_bad(tmp_path)
    assert "images/c.png" in msg and "cannot read image" in msg


def test_truncated_jpeg(tmp_path: Path) -> None:
    make_folder(tmp_path / "raw", LABELS)
    path = save(tmp_path / "raw" / "images" / "d.jpg", rgb(40, 48, 1), quality=90)
    (tmp_path / "raw" / "images" / "d.png").unlink()
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    msg = _prepare_bad(tmp_path)
    assert "images/d.jpg" in msg and "truncated" in msg


def test_image_without_mask(tmp_path: Path) -> None:
    make_folder(tmp_path / "raw", LABELS)
    (tmp_path / "raw" / "masks" / "b.png").unlink()
    msg = _prepare_bad(tmp_path)
    assert "images/b.png: no mask" in msg


def test_mask_value_outside_classes(tmp_path: Path) -> None:
    written = make_folder(tmp_path / "raw", LABELS)
    mask = written["e"][1].copy()
    mask[0, :3] = 5
    save(tmp_path / "raw" / "masks" / "e.png", mask)
    msg = _prepare_bad(tmp_path)
    assert "masks/e.png: mask value(s) [5] outside the declared classes 0..2" in msg


def test_missing_label(tmp_path: Path) -> None:
    make_folder(tmp_path / "raw", {k: v for k, v in LABELS.items() if k != "d"})
    save(tmp_path / "raw" / "images" / "d.png", rgb(40, 48, 3))
    save(tmp_path / "raw" / "masks" / "d.png", np.zeros((40, 48), np.uint8))
    msg = _prepare_bad(tmp_path)
    assert "images/d.png: missing label" in msg and "labels.csv" in msg


def test_empty_label_cell(tmp_path: Path) -> None:
    make_folder(tmp_path / "raw", LABELS | {"c": ""})
    assert "missing label for 'c'" in _prepare_bad(tmp_path)


def test_unknown_label(tmp_path: Path) -> None:
    make_folder(tmp_path / "raw", LABELS | {"f": "maybe"})
    msg = _prepare_bad(tmp_path, class_names=["a", "b"])
    assert "unknown label 'maybe' for 'f'" in msg and "images/f.png" in msg


def test_image_mask_size_mismatch(tmp_path: Path) -> None:
    make_folder(tmp_path / "raw", LABELS)
    save(tmp_path / "raw" / "masks" / "c.png", np.zeros((40, 40), np.uint8))
    msg = _prepare_bad(tmp_path)
    assert "masks/c.png: mask size 40x40 does not match image c.png size 48x40" in msg


def test_empty_split(tmp_path: Path) -> None:
    make_folder(tmp_path / "raw", {"a": "x", "b": "y"})
    # 2 images: test and calib take one each (0.25 * 2 = 0.5 rounds up), val none (0.14), train the rest: none.
    assert "split(s) ['train', 'val'] would be empty" in _prepare_bad(tmp_path, positive_class="y")


def test_zero_images(tmp_path: Path) -> None:
    (tmp_path / "raw" / "images").mkdir(parents=True)
    (tmp_path / "raw" / "masks").mkdir()
    (tmp_path / "raw" / "labels.csv").write_text("id,label\n")
    assert "images: no images found" in _prepare_bad(tmp_path)


def test_failed_prepare_keeps_previous_store(tmp_path: Path) -> None:
    make_folder(tmp_path / "raw", LABELS)
    # One image in each held-out split of the six.
    folder = dict(source="folder", path=str(tmp_path / "raw"), positive_class="b", split={"val": 0.2, "test": 0.2, "calib": 0.2})
    good = open_prepared(prepare(params_for(tmp_path, **folder))).content_hash
    (tmp_path / "raw" / "images" / "f.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match="f.png"):
        prepare(params_for(tmp_path, **folder))
    assert open_prepared(store_path(tmp_path)).content_hash == good
    assert [p.name for p in leftovers(tmp_path)] == ["dataset.zarr"]


def test_cli_bad_input_exits_nonzero_naming_the_file(tmp_path: Path) -> None:
    make_folder(tmp_path / "raw", LABELS)
    Image.new("RGB", (4, 4)).save(tmp_path / "raw" / "images" / "a.png")  # 4x4 image, 40x48 mask
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"data": {"source": "folder", "path": str(tmp_path / "raw"), "positive_class": "b",
                                               "root": str(tmp_path / "out"), "image_size": 32}}))
    env = os.environ | {"NO_ALBUMENTATIONS_UPDATE": "1"}
    proc = subprocess.run([sys.executable, "-m", "pipeline.prepare", "--params", str(params)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "prepare: error:" in proc.stderr and "masks/a.png" in proc.stderr and "does not match" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not store_path(tmp_path).exists() and leftovers(tmp_path) == []


def test_prepare_says_when_dvc_does_not_version_the_raw_data(tmp_path: Path, monkeypatch, caplog) -> None:
    from uml.data.prepare import dvc_tracking_note

    repo = tmp_path / "repo"
    (repo / ".dvc").mkdir(parents=True)
    raw = repo / "data" / "raw"
    (raw / "scans").mkdir(parents=True)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    assert "lies outside the DVC repository" in dvc_tracking_note(outside, start=repo)
    assert "`dvc add data/raw/scans`" in dvc_tracking_note(raw / "scans", start=repo / "data")
    (raw / "scans.dvc").write_text("outs:\n- path: scans\n")  # what `dvc add data/raw/scans` writes
    assert dvc_tracking_note(raw / "scans", start=repo) is None
    assert dvc_tracking_note(raw / "scans" / "part", start=repo) is None  # inside a tracked folder
    assert dvc_tracking_note(raw, start=repo) is None  # a folder holding tracked data
    assert dvc_tracking_note(outside, start=tmp_path) is None  # not in a DVC repository: nothing to say
    # The stage logs it (DVC runs it in the repository).
    make_folder(raw / "new", LABELS)
    monkeypatch.chdir(repo)
    with caplog.at_level("WARNING", logger="uml.data.prepare"):
        prepare(params_for(tmp_path, source="folder", path="data/raw/new", positive_class="b",
                           split={"val": 0.2, "test": 0.2, "calib": 0.2}))
    assert "data.path data/raw/new is not versioned by DVC" in caplog.text and "`dvc add data/raw/new`" in caplog.text


# ------------------------------------------------------------------------ parallel decoding
def _store_identity(out: Path) -> tuple:
    data = open_prepared(out)
    return data.content_hash, data.attrs["checksums"], data.ids, data.attrs["fingerprint"]


@pytest.mark.parametrize("source", ["synthetic", "folder"])
def test_the_store_is_the_same_whatever_the_number_of_decoding_processes(tmp_path: Path, source: str, monkeypatch) -> None:
    prepare_module = sys.modules["uml.data.prepare"]  # the package's name "prepare" is the function
    if source == "folder":
        labels = {f"img{i:02d}": ("sick" if i % 3 == 0 else "well") for i in range(21)}
        make_folder(tmp_path / "raw", labels, size=(40, 48))
        data = {"source": "folder", "path": str(tmp_path / "raw"), "positive_class": "sick"}
    else:
        data = {"synthetic": {"num_images": 21, "render_size": 64}}
    # 21 images in shards of 2 (at least store.MIN_SHARDS shards): 11 shard tasks over 2 workers,
    # several in flight, the last one short.
    built = []
    real = prepare_module.ParallelShards.write_shards

    def recording_write_shards(self, path, shards, check):
        built.append((self.workers, [len(shard) for shard in shards]))
        return real(self, path, shards, check)

    monkeypatch.setattr(prepare_module.ParallelShards, "write_shards", recording_write_shards)
    one = prepare(params_for(tmp_path / "one", prepare_workers=1, **data))
    two = prepare(params_for(tmp_path / "two", prepare_workers=2, **data))
    assert built == [(2, [2] * 10 + [1])]  # one process wrote the first store, two workers the second
    assert _store_identity(one) == _store_identity(two)  # content hash and every file's sha256
    assert compute_content_hash(two) == open_prepared(two).content_hash


def test_an_error_in_a_decoding_process_names_the_file_and_leaves_no_store(tmp_path: Path) -> None:
    labels = {f"img{i:02d}": "a" if i % 2 else "b" for i in range(12)}
    make_folder(tmp_path / "raw", labels, size=(32, 32))
    (tmp_path / "raw" / "images" / "img07.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"img07\.png"):
        prepare(params_for(tmp_path, source="folder", path=str(tmp_path / "raw"), positive_class="a", prepare_workers=2))
    assert not store_path(tmp_path).exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize(("cpus", "images", "setting", "expected"), [
    (2, 1400, None, 2), (16, 1400, None, 8), (16, 200, None, 3), (2, 60, None, 1), (1, 5000, None, 1),
    (2, 60, 3, 3),  # an explicit count is taken as it is
])
def test_the_default_number_of_decoding_processes(monkeypatch, cpus, images, setting, expected) -> None:
    from uml.config import DataParams

    prepare_module = sys.modules["uml.data.prepare"]
    monkeypatch.setattr(prepare_module, "available_cpus", lambda: cpus)
    assert prepare_module.prepare_processes(DataParams(prepare_workers=setting), images) == expected
