"""``uml predict``: outputs on real and synthetic fundus photographs, accepted formats, clear errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.toy_onnx import draw_fundus, export_toy
from uml.cli import main


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    return export_toy(tmp_path_factory.mktemp("toy") / "models")


def predict(model_path: Path, out: Path, *images: Path) -> int:
    return main(["predict", *map(str, images), "--model", str(model_path), "--out", str(out)])


def save(path: Path, array: np.ndarray, **kwargs) -> Path:
    Image.fromarray(array).save(path, **kwargs)
    return path


def test_predict_on_the_scikit_image_retina(model_path, tmp_path, capsys):
    from skimage import data

    retina = save(tmp_path / "retina.png", data.retina())
    assert predict(model_path, tmp_path / "out", retina) == 0
    assert "[1/1]" in capsys.readouterr().out

    record = json.loads((tmp_path / "out" / "retina.json").read_text())
    probs = record["probabilities"]
    assert set(probs) == {"non-glaucoma", "glaucoma"}
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-5)
    assert all(0.0 <= p <= 1.0 for p in probs.values())
    assert record["probability"] == max(probs.values()) and probs[record["class"]] == record["probability"]
    assert 0.0 < record["class_uncertainty"] <= 1.0
    assert record["vcdr"] is None or 0.0 <= record["vcdr"] <= 1.0
    assert record["size"] == [1411, 1411] and record["model_resolution"] == 64
    assert 0 <= record["cup_area_pixels"] <= record["disc_area_pixels"] <= 64 * 64
    assert record["disc_area_fraction"] == pytest.approx(record["disc_area_pixels"] / 64**2)
    assert 0.0 < record["mean_pixel_uncertainty"] <= 1.0

    overlay = tmp_path / "out" / "retina_overlay.png"
    with Image.open(overlay) as image:
        assert image.format == "PNG" and image.width > 300 and image.height > 300
        # Not a blank canvas: the photograph is drawn.
        assert np.asarray(image.convert("L")).std() > 10


@pytest.mark.parametrize(("ratio", "expected"), [(0.7, "glaucoma"), (0.3, "non-glaucoma")])
def test_predict_values_on_a_drawn_fundus(model_path, tmp_path, ratio, expected):
    # 256 px with a disc of radius 80: after resizing to 64 px, a disc of radius 20.
    image, _ = draw_fundus(256, 80, ratio)
    assert predict(model_path, tmp_path, save(tmp_path / "eye.png", image)) == 0
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
