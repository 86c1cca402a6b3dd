"""``uml predict``: outputs on real and synthetic fundus photographs, accepted formats, clear errors.

Most tests run the model the miniature DAG exported (tests/dag/miniature.py): what users predict
with. The toy graph of tests/toy_onnx.py appears only where a test needs a model whose answer is
known in advance or one that breaks the export contract, with a comment saying so.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.toy_onnx import draw_fundus, export_toy, move_model_away_once_shipped
from uml.cli import main


@pytest.fixture(scope="module")
def model_path(miniature_dag) -> Path:
    """The real exported UML model (model.onnx + metadata.json of the miniature DAG)."""
    return miniature_dag.data / "models" / "model.onnx"


@pytest.fixture(scope="module")
def toy_path(tmp_path_factory) -> Path:
    # Controlled model: its class, vCDR and areas are known for a drawn fundus (tests/toy_onnx.py).
    return export_toy(tmp_path_factory.mktemp("toy") / "models")


def predict(model_path: Path, out: Path, *images: Path) -> int:
    return main(["predict", *map(str, images), "--model", str(model_path), "--out", str(out)])


def save(path: Path, array: np.ndarray, **kwargs) -> Path:
    Image.fromarray(array).save(path, **kwargs)
    return path


def test_predict_on_the_scikit_image_retina(model_path, tmp_path, capsys):
    """A real fundus photograph (1408 px: the 1411 px one cropped to 22 x 64) through the real
    model: the record holds what onnxruntime computes on the photograph shrunk by 22 x 22 block
    means (area resizing, written out with numpy)."""
    from skimage import data

    from tests.dag.reference import onnx_outputs, vertical_cdr

    photo = data.retina()[:1408, :1408]
    retina = save(tmp_path / "retina.png", photo)
    assert predict(model_path, tmp_path / "out", retina) == 0
    assert "[1/1]" in capsys.readouterr().out

    record = json.loads((tmp_path / "out" / "retina.json").read_text())
    small = np.round(photo.reshape(64, 22, 64, 22, 3).astype(np.float64).mean(axis=(1, 3))).astype(np.uint8)
    expected = onnx_outputs(model_path, small[None])
    prob, mask = expected["class_prob"][0], expected["seg_prob"][0].argmax(axis=0)
    # Rounding of exact halves may differ by one grey level on a few values: near, not bit-equal.
    assert record["probabilities"] == pytest.approx({"non-glaucoma": prob[0], "glaucoma": prob[1]}, abs=2e-3)
    if abs(prob[1] - prob[0]) > 4e-3:  # not a near tie that one grey level could tip
        assert record["class"] == ["non-glaucoma", "glaucoma"][int(prob.argmax())]
    assert record["probability"] == max(record["probabilities"].values())
    assert record["class_uncertainty"] == pytest.approx(float(expected["class_uncertainty"][0, 0]), abs=2e-3)
    assert record["size"] == [1408, 1408] and record["model_resolution"] == 64
    assert abs(record["disc_area_pixels"] - int((mask >= 1).sum())) <= 4
    assert abs(record["cup_area_pixels"] - int((mask == 2).sum())) <= 4
    assert record["disc_area_fraction"] == record["disc_area_pixels"] / 64**2
    # The vCDR of the optic disc the model found (its largest disc component), not of every blob.
    vcdr = vertical_cdr(mask)
    assert (record["vcdr"] is None) == np.isnan(vcdr) and (record["vcdr"] is None or abs(record["vcdr"] - vcdr) < 0.1)
    assert record["mean_pixel_uncertainty"] == pytest.approx(float(expected["seg_uncertainty"].mean()), abs=2e-3)
    assert record["raw"]["class_uncertainty"] == pytest.approx(float(expected["class_uncertainty_raw"][0, 0]), abs=2e-3)
    assert record["raw"]["probabilities"]["glaucoma"] == pytest.approx(float(expected["class_prob_raw"][0, 1]), abs=2e-3)
    meta = json.loads(model_path.with_name("metadata.json").read_text())["calibration"]
    half = meta["vcdr_interval"]["by_class"].get(record["class"], meta["vcdr_interval"]["halfwidth"])
    if record["vcdr"] is not None and half is not None:
        assert record["vcdr_interval"] == pytest.approx([max(0.0, record["vcdr"] - half), min(1.0, record["vcdr"] + half)])
    assert record["refer"] == bool(record["refer_reasons"]) and record["unusual_threshold"] == meta["unusual"]["threshold"]

    overlay = tmp_path / "out" / "retina_overlay.png"
    with Image.open(overlay) as image:
        assert image.format == "PNG" and image.width > 300 and image.height > 300
        # Not a blank canvas: the photograph is drawn.
        assert np.asarray(image.convert("L")).std() > 10


def test_a_grayscale_photograph_is_referred_as_unusual(model_path, tmp_path):
    """The grayscale copy of the retina photograph: no colour at all, so far below every calibration
    image that its colourfulness alone lies beyond the unusual-image threshold; it is referred as an
    unusual image (the reason names the statistic furthest out), whatever the class output says."""
    from skimage import data

    gray = np.repeat(data.retina()[:1408, :1408].mean(axis=2, keepdims=True), 3, axis=2).astype(np.uint8)
    assert predict(model_path, tmp_path / "out", save(tmp_path / "gray.png", gray)) == 0
    record = json.loads((tmp_path / "out" / "gray.json").read_text())
    assert record["refer"] is True
    assert any(reason.startswith("unusual image: ") for reason in record["refer_reasons"]), record["refer_reasons"]
    assert record["unusual_score"] > record["unusual_threshold"]
    rule = json.loads(model_path.with_name("metadata.json").read_text())["calibration"]["unusual"]
    colour = rule["statistics"].index("colourfulness")
    assert (0.0 - rule["center"][colour]) / rule["scale"][colour] < -rule["threshold"]  # colourfulness 0


def test_an_image_too_small_for_a_fundus_is_refused(model_path, tmp_path, capsys):
    tiny = save(tmp_path / "dot.png", np.zeros((1, 1, 3), np.uint8))
    fine = save(tmp_path / "eye.png", draw_fundus(96, 30, 0.5)[0])
    assert predict(model_path, tmp_path / "out", tiny, fine) == 1
    err = capsys.readouterr().err
    assert f"{tiny}: 1x1 px is too small to hold a fundus photograph" in err and "min_image_side" in err
    assert not (tmp_path / "out" / "dot.json").exists() and (tmp_path / "out" / "eye.json").exists()


def test_the_referral_decision_and_its_reasons(toy_path, tmp_path):
    # Controlled model (toy): a cup/disc ratio far from 0.5 gives a confident answer, one at 0.5 an
    # uncertain one above the toy's threshold (tests/toy_onnx.py); noise makes the image unusual.
    from tests.toy_onnx import REFERRAL_THRESHOLD

    clear, _ = draw_fundus(256, 80, 0.75)
    borderline, _ = draw_fundus(256, 80, 0.5)
    small, _ = draw_fundus(64, 20, 0.75)  # at model resolution: resizing would average the noise away
    noisy = np.clip(small + np.random.default_rng(0).normal(0, 50, small.shape), 0, 255).astype(np.uint8)
    paths = [save(tmp_path / f"{name}.png", image) for name, image in (("clear", clear), ("borderline", borderline),
                                                                     ("noisy", noisy))]
    assert predict(toy_path, tmp_path / "out", *paths) == 0
    records = {p.stem: json.loads((tmp_path / "out" / f"{p.stem}.json").read_text()) for p in paths}
    assert records["clear"]["refer"] is False and records["clear"]["refer_reasons"] == []
    assert records["clear"]["class_uncertainty"] <= REFERRAL_THRESHOLD
    assert records["borderline"]["class_uncertainty"] > REFERRAL_THRESHOLD and records["borderline"]["refer"] is True
    assert records["borderline"]["refer_reasons"][0].startswith("uncertain classification: estimated error probability")
    assert any(r.startswith("unusual image: ") for r in records["noisy"]["refer_reasons"]), records["noisy"]
    assert records["noisy"]["unusual_score"] > 5.0 > records["clear"]["unusual_score"]
    assert records["clear"]["vcdr_interval"] == pytest.approx([records["clear"]["vcdr"] - 0.05, records["clear"]["vcdr"] + 0.05])


@pytest.mark.parametrize(("ratio", "expected"), [(0.7, "glaucoma"), (0.3, "non-glaucoma")])
def test_predict_values_on_a_drawn_fundus(toy_path, tmp_path, ratio, expected):
    # Controlled model (toy): the class, vCDR and areas of a drawn fundus are known in advance.
    # 256 px with a disc of radius 80: after resizing to 64 px, a disc of radius 20.
    image, _ = draw_fundus(256, 80, ratio)
    assert predict(toy_path, tmp_path, save(tmp_path / "eye.png", image)) == 0
    record = json.loads((tmp_path / "eye.json").read_text())
    assert record["class"] == expected
    assert record["vcdr"] == pytest.approx(ratio, abs=0.05)
    assert record["disc_area_fraction"] == pytest.approx(math.pi * 20**2 / 64**2, rel=0.05)
    assert record["cup_area_fraction"] == pytest.approx(math.pi * (20 * ratio) ** 2 / 64**2, rel=0.1)


def test_accepted_formats_give_consistent_predictions(model_path, tmp_path):
    image, _ = draw_fundus(96, 30, 0.6)
    rgb = save(tmp_path / "rgb.png", image)
    rgba = save(tmp_path / "rgba.png", np.concatenate([image, np.full(image.shape[:2] + (1,), 7, np.uint8)], axis=-1))
    gray = save(tmp_path / "gray.png", image[..., 1])
    gray16 = tmp_path / "gray16.png"
    Image.fromarray(image[..., 1].astype(np.uint16) * 257).save(gray16)
    jpeg = save(tmp_path / "photo.jpg", image, quality=95)
    assert predict(model_path, tmp_path / "out", rgb, rgba, gray, gray16, jpeg) == 0

    def load(stem):
        return json.loads((tmp_path / "out" / f"{stem}.json").read_text())

    # Alpha is dropped, not composited: RGBA predicts exactly as RGB.
    assert load("rgba")["probabilities"] == load("rgb")["probabilities"]
    # 16-bit grayscale is scaled to 8 bit: the same as the 8-bit grayscale file.
    assert load("gray16")["probabilities"] == pytest.approx(load("gray")["probabilities"])
    for stem in ("gray", "photo"):
        assert (tmp_path / "out" / f"{stem}_overlay.png").stat().st_size > 1000


def test_unreadable_inputs_fail_with_the_file_name(model_path, tmp_path, capsys):
    tifffile = pytest.importorskip("tifffile")
    not_image = tmp_path / "notes.png"
    not_image.write_text("this is text")
    two_channel = tmp_path / "two.tif"
    tifffile.imwrite(two_channel, np.zeros((32, 32, 2), np.uint8), photometric="minisblack", planarconfig="contig")
    stack = tmp_path / "stack.tif"
    tifffile.imwrite(stack, np.zeros((3, 32, 32, 3), np.uint8), photometric="rgb")
    good, _ = draw_fundus(64, 20, 0.4)
    good = save(tmp_path / "good.png", good)

    status = predict(model_path, tmp_path / "out", not_image, two_channel, stack, tmp_path / "missing.png", good)
    assert status == 1
    err = capsys.readouterr().err
    assert f"{not_image}: not a readable image" in err
    assert f"{two_channel}: has 2 channels per pixel" in err
    assert f"{stack}: has 3 frames" in err
    assert f"{tmp_path / 'missing.png'}: file not found" in err
    assert "4 of 5 images failed" in err
    # The good image is still predicted; nothing is written for the bad ones.
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good.json", "good_overlay.png"]


def test_a_model_that_is_not_the_expected_onnx_fails(model_path, tmp_path, capsys):
    image = save(tmp_path / "eye.png", draw_fundus(64, 20, 0.4)[0])
    fake = tmp_path / "fake" / "model.onnx"
    fake.parent.mkdir()
    fake.write_bytes(b"\x00\x01 definitely not protobuf")
    (fake.parent / "metadata.json").write_text((model_path.parent / "metadata.json").read_text())
    assert predict(fake, tmp_path / "out", image) == 1
    err = capsys.readouterr().err
    assert f"{fake}: not a loadable ONNX model" in err

    # Controlled model (toy): an export whose input breaks the contract.
    wrong = export_toy(tmp_path / "wrong", input_name="pixels")
    assert predict(wrong, tmp_path / "out", image) == 1
    assert "expected one input named 'image'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_duplicate_stems_are_refused(model_path, tmp_path, capsys):
    image = draw_fundus(64, 20, 0.4)[0]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert predict(model_path, tmp_path / "out", save(tmp_path / "a" / "eye.png", image), save(tmp_path / "b" / "eye.png", image)) == 1
    assert "same name stem" in capsys.readouterr().err


def test_console_entry_point_exit_status(model_path, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("nope")
    run = subprocess.run([sys.executable, "-m", "uml.cli", "predict", str(bad), "--model", str(model_path), "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    assert f"{bad}: not a readable image" in run.stderr
    usage = subprocess.run([sys.executable, "-m", "uml.cli", "predict"], capture_output=True, text=True, timeout=120)
    assert usage.returncode == 2 and "IMAGE" in usage.stderr


# ------------------------------------------------------------------- hostile or odd inputs
def _png_claiming(path: Path, width: int, height: int) -> Path:
    """A small valid PNG whose header (IHDR) claims ``width`` x ``height`` pixels."""
    import struct
    import zlib

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path)
    raw = bytearray(path.read_bytes())
    assert raw[12:16] == b"IHDR"
    raw[16:24] = struct.pack(">II", width, height)
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])))
    path.write_bytes(bytes(raw))
    return path


def test_a_decompression_bomb_is_a_per_file_error_and_the_rest_are_predicted(model_path, tmp_path, capsys):
    bomb = _png_claiming(tmp_path / "bomb.png", 20000, 20000)
    with pytest.raises(Image.DecompressionBombError):  # what Pillow does on its own
        Image.open(bomb)
    good = save(tmp_path / "good.png", draw_fundus(64, 20, 0.4)[0])
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:60])
    status = predict(model_path, tmp_path / "out", bomb, truncated, good)
    captured = capsys.readouterr()
    assert status == 1
    assert f"{bomb}: too large to read safely (Image size (400000000 pixels) exceeds limit" in captured.err
    assert f"{truncated}: not a readable image" in captured.err and "Traceback" not in captured.err
    assert "2 of 3 images failed" in captured.err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good.json", "good_overlay.png"]


def _peak_rss_mb(args: list[str]) -> float:
    """Peak resident memory of ``uml predict args`` run in a process of its own."""
    probe = ("import resource, subprocess, sys; "
             f"r = subprocess.run([sys.executable, '-m', 'uml.cli', 'predict', *{args!r}]); "
             "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=600)
    status, kib = out.stdout.split()[-2:]
    assert status == "0", out.stderr[-2000:]
    return int(kib) / 1024


@pytest.mark.slow
def test_a_huge_image_is_predicted_in_memory_bounded_by_its_decoded_size(model_path, tmp_path):
    side = 8000  # 64 M pixels, 192 MB decoded; the full-size overlay used about 60 bytes per pixel
    huge = tmp_path / "huge.png"
    canvas = np.zeros((side, side, 3), np.uint8)
    canvas[:, :, 0] = 90
    eye, _ = draw_fundus(1000, 300, 0.5)
    canvas[3500:4500, 3500:4500] = eye
    Image.fromarray(canvas).save(huge, compress_level=1)
    del canvas
    small = save(tmp_path / "small.png", eye)
    common = ["--model", str(model_path), "--out", str(tmp_path / "out")]
    baseline = _peak_rss_mb([str(small), *common])
    peak = _peak_rss_mb([str(huge), *common])
    decoded_mb = side * side * 3 / 2**20
    # The decoded image and a few copies of it (Pillow's, numpy's), not a full-size drawing.
    assert peak - baseline < 4 * decoded_mb, (peak, baseline)
    record = json.loads((tmp_path / "out" / "huge.json").read_text())
    assert record["size"] == [side, side]
    with Image.open(tmp_path / "out" / "huge_overlay.png") as overlay:
        assert max(overlay.size) < 2000  # drawn from the display copy


def test_outputs_replace_links_in_out_and_never_write_through_them(model_path, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (out / "eye.json").symlink_to(victim)
    (out / "eye_overlay.png").symlink_to(tmp_path / "nowhere.png")  # dangling: would create the target
    eye = save(tmp_path / "eye.png", draw_fundus(64, 20, 0.4)[0])
    assert predict(model_path, out, eye) == 0
    assert victim.read_text() == "precious" and not (tmp_path / "nowhere.png").exists()
    assert not (out / "eye.json").is_symlink() and json.loads((out / "eye.json").read_text())["image"] == str(eye)
    assert not (out / "eye_overlay.png").is_symlink() and (out / "eye_overlay.png").stat().st_size > 1000
    assert sorted(p.name for p in out.iterdir()) == ["eye.json", "eye_overlay.png"]  # no temporary files left
    assert oct((out / "eye.json").stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_out_naming_a_file_is_a_clear_error(model_path, tmp_path, capsys):
    eye = save(tmp_path / "eye.png", draw_fundus(64, 20, 0.4)[0])
    taken = tmp_path / "results.txt"
    taken.write_text("not a folder")
    assert predict(model_path, taken, eye) == 1
    assert f"uml predict: error: {taken}: --out must be a folder, but a file of that name exists" in capsys.readouterr().err
    assert taken.read_text() == "not a folder"
    assert predict(model_path, taken / "sub", eye) == 1
    assert f"{taken / 'sub'}: cannot create the output folder" in capsys.readouterr().err


def test_an_output_that_cannot_be_written_fails_that_image_only(model_path, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "first.json").mkdir(parents=True)  # a folder where first's record should go
    image = draw_fundus(64, 20, 0.4)[0]
    first, second = save(tmp_path / "first.png", image), save(tmp_path / "second.png", image)
    assert predict(model_path, out, first, second) == 1
    err = capsys.readouterr().err
    assert f"{first}: cannot write its outputs to {out}" in err and "1 of 2 images failed" in err
    assert (out / "second.json").is_file() and (out / "second_overlay.png").is_file()
    assert not [p for p in out.iterdir() if p.name.endswith(".partial")]


def test_a_model_and_metadata_of_different_exports_are_refused(model_path, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    (other / "model.onnx").write_bytes(model_path.read_bytes())
    meta = json.loads((model_path.parent / "metadata.json").read_text())
    eye = save(tmp_path / "eye.png", draw_fundus(64, 20, 0.4)[0])
    # The same graph with one byte of its producer string changed: loadable, but not the file described.
    raw = bytearray(model_path.read_bytes())
    at = raw.index(b"pytorch")
    raw[at] = ord("P")
    (other / "model.onnx").write_bytes(bytes(raw))
    (other / "metadata.json").write_text(json.dumps(meta))
    assert predict(other / "model.onnx", tmp_path / "out", eye) == 1
    err = capsys.readouterr().err
    assert f"{other / 'model.onnx'}: its SHA-256" in err and "come from different exports" in err
    del meta["onnx_sha256"]
    (other / "metadata.json").write_text(json.dumps(meta))
    assert predict(other / "model.onnx", tmp_path / "out", eye) == 1
    assert "has no 'onnx_sha256'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_predict_over_ray_tasks_writes_what_one_process_writes(toy_path, tmp_path, capsys, monkeypatch):
    # Controlled model (toy): only the wiring is under test. Five images and a file that is no
    # image, cut into 3 shards run as Ray tasks on a local instance: each output file must be the
    # one-process run's, byte for byte, and the bad file an error named in the exit status.
    # The model is a copy whose folder the driver moves away as soon as it has read the files to ship,
    # before any task starts: the tasks must open what came through Ray's object store, as on a
    # node without the driver's folder.
    import shutil

    import uml.predict

    copy, away = tmp_path / "models", tmp_path / "moved-models"
    shutil.copytree(toy_path.parent, copy)
    move_model_away_once_shipped(monkeypatch, uml.predict, copy, away)
    images = [save(tmp_path / f"eye{i}.png", draw_fundus(128, 40, ratio)[0]) for i, ratio in enumerate((0.2, 0.35, 0.5, 0.65, 0.8))]
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    files = [*images[:2], bad, *images[2:]]
    assert predict(toy_path, tmp_path / "one", *files) == 1
    capsys.readouterr()
    status = main(["predict", *map(str, files), "--model", str(copy / toy_path.name), "--out", str(tmp_path / "ray"),
                   "--workers", "3"])
    out, err = capsys.readouterr()
    assert status == 1, err[-3000:]
    assert away.is_dir() and not copy.exists()
    assert "predicting 6 images as 3 Ray tasks of at most 2 images each" in out
    assert "the 3 tasks ran on 1 Ray node(s)" in out
    assert f"error: {bad}" in err and "uml predict: 1 of 6 images failed" in err
    written = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert written == sorted(p.name for p in (tmp_path / "ray").iterdir())
    assert len(written) == 10  # a JSON and an overlay per readable image
    for name in written:
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name


def test_predict_workers_must_not_be_negative(toy_path, tmp_path, capsys):
    image = save(tmp_path / "eye.png", draw_fundus(128, 40, 0.5)[0])
    assert main(["predict", str(image), "--model", str(toy_path), "--out", str(tmp_path), "--workers", "-1"]) == 1
    assert "--workers and --gpus-per-worker must be >= 0, got -1 and 0.0" in capsys.readouterr().err
