"""REFUGE and folder importers: layouts, decoding, resizing and mask/label mapping."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from tests.data.helpers import make_folder, make_refuge_flat, make_refuge_training400, params_for, rgb, save
from uml.data.importers import folder_source, refuge_source
from uml.errors import ConfigError, DataError


# Expected images and masks are built here from the definitions of the resampling, not with the
# OpenCV calls the importer makes: the area and linear weights written out with numpy (within one
# grey level of OpenCV, whose fixed-point arithmetic may round halves the other way), and the masks
# by Pillow's nearest neighbour (the pixel-centre rule that INTER_NEAREST_EXACT reproduces).
def _area_weights(src: int, dst: int) -> np.ndarray:
    """(dst, src): the share of source pixel j in output pixel i, each output pixel averaging the
    src / dst source pixels it covers (fractions at its edges)."""
    scale = src / dst
    weights = np.zeros((dst, src))
    for i in range(dst):
        low, high = i * scale, (i + 1) * scale
        for j in range(int(np.floor(low)), int(np.ceil(high))):
            weights[i, j] = (min(high, j + 1) - max(low, j)) / scale
    return weights


def _linear_weights(src: int, dst: int) -> np.ndarray:
    """(dst, src): linear interpolation between the two source pixels around output pixel i's
    centre mapped into the source ((i + 0.5) * src / dst - 0.5), clamped at the borders."""
    weights = np.zeros((dst, src))
    for i in range(dst):
        x = min(max((i + 0.5) * src / dst - 0.5, 0.0), src - 1.0)
        j, frac = int(np.floor(x)), x - np.floor(x)
        weights[i, j] += 1.0 - frac
        if frac:
            weights[i, j + 1] += frac
    return weights


def _expected(image: np.ndarray, mask: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    h, w = image.shape[:2]
    make = _area_weights if size < max(h, w) else _linear_weights  # area when shrinking, linear when enlarging
    rows, cols = make(h, size), make(w, size)
    resized = np.einsum("ij,jkc,lk->ilc", rows, image.astype(np.float64), cols)
    nearest = np.asarray(Image.fromarray(mask).resize((size, size), Image.Resampling.NEAREST))
    return resized, nearest


def _assert_resized(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.dtype == np.uint8 and actual.shape == expected.shape
    assert np.abs(actual.astype(np.float64) - expected).max() <= 1.0, np.abs(actual - expected).max()


def test_folder_records_exact(tmp_path: Path) -> None:
    written = make_folder(tmp_path / "raw", {"b": "sick", "a": "healthy", "c": "sick"})
    src = folder_source(params_for(tmp_path, source="folder", path=str(tmp_path / "raw"), positive_class="sick").data)
    assert src.class_names == ["healthy", "sick"]  # sorted unique labels
    assert src.positive_class == 1
    assert src.mask_classes == ["background", "disc", "cup"]
    records = list(src)
    assert [r.id for r in records] == ["a", "b", "c"] and [r.label for r in records] == [0, 1, 1]
    for r in records:
        image, mask = _expected(*written[r.id], 32)
        _assert_resized(r.image, image)
        assert np.array_equal(r.mask, mask)
        assert r.origin.endswith(f"images/{r.id}.png")


def test_folder_positive_class_is_declared_never_guessed(tmp_path: Path) -> None:
    root = tmp_path / "raw"
    make_folder(root, {"a": "normal", "b": "glaucoma", "c": "normal"})
    folder = dict(source="folder", path=str(root))
    # Text labels sort as [glaucoma, normal]: "the last one" would score "normal" as the disease.
    with pytest.raises(ConfigError, match=r"data\.positive_class: .*labels\.csv has text labels \['glaucoma', 'normal'\]"):
        folder_source(params_for(tmp_path, **folder).data)
    assert folder_source(params_for(tmp_path, **folder, positive_class="glaucoma").data).positive_class == 0
    with pytest.raises(ConfigError, match=r"data\.positive_class: 'sick' is not one of the classes \['glaucoma', 'normal'\]"):
        folder_source(params_for(tmp_path, **folder, positive_class="sick").data)
    # Declared order: the last declared class, unless positive_class names another.
    declared = folder_source(params_for(tmp_path, **folder, class_names=["normal", "glaucoma"]).data)
    assert declared.class_names == ["normal", "glaucoma"] and declared.positive_class == 1
    # Integer labels: the largest.
    make_folder(tmp_path / "ints", {"a": "0", "b": "1", "c": "1"})
    assert folder_source(params_for(tmp_path, source="folder", path=str(tmp_path / "ints")).data).positive_class == 1
    # The fundus sources declare glaucoma; another name is a contradiction, not an override.
    from uml.data.prepare import open_source

    with pytest.raises(ConfigError, match=r"data\.positive_class: the synthetic source's positive class is 'glaucoma', got 'normal'"):
        open_source(params_for(tmp_path, source="synthetic", positive_class="normal").data)
    assert open_source(params_for(tmp_path, source="synthetic", positive_class="glaucoma").data).positive_class == 1


def test_folder_integer_labels_declared_names_and_mask_values(tmp_path: Path) -> None:
    root = tmp_path / "raw"
    written = make_folder(root, {"x": "1", "y": "0", "z": "1"}, size=(24, 24))  # enlarging 24 -> 32
    for item_id, (_, mask) in written.items():  # store masks as grey levels 0/100/200
        save(root / "masks" / f"{item_id}.png", (mask * 100).astype(np.uint8))
    params = params_for(tmp_path, source="folder", path=str(root), class_names=["normal", "glaucoma"],
                        mask_values={0: 0, 100: 1, 200: 2})
    src = folder_source(params.data)
    records = {r.id: r for r in src}
    assert src.class_names == ["normal", "glaucoma"]
    assert {k: r.label for k, r in records.items()} == {"x": 1, "y": 0, "z": 1}
    for item_id, (image, mask) in written.items():
        exp_image, exp_mask = _expected(image, mask, 32)
        _assert_resized(records[item_id].image, exp_image)  # linear when enlarging
        assert np.array_equal(records[item_id].mask, exp_mask)


def test_folder_numeric_labels_sort_numerically(tmp_path: Path) -> None:
    make_folder(tmp_path / "raw", {"a": "10", "b": "9", "c": "2"}, size=(32, 32))
    src = folder_source(params_for(tmp_path, source="folder", path=str(tmp_path / "raw")).data)
    assert src.class_names == ["2", "9", "10"]
    assert [r.label for r in src] == [2, 1, 0]


def test_folder_jpeg_grey_rgba_and_16bit_images(tmp_path: Path) -> None:
    root = tmp_path / "raw"
    make_folder(root, {"a": "p", "b": "q", "c": "p", "d": "q"}, size=(32, 32))
    base = rgb(32, 32, 0)
    (root / "images" / "a.png").unlink()
    save(root / "images" / "a.jpg", base, quality=95)
    grey = base[..., 1]
    save(root / "images" / "b.png", grey)
    rgba = np.dstack([base, np.full((32, 32), 7, np.uint8)])
    save(root / "images" / "c.png", rgba)
    Image.fromarray((grey.astype(np.uint16) * 257)).save(root / "images" / "d.png")  # 16-bit grey
    src = folder_source(params_for(tmp_path, source="folder", path=str(root), positive_class="q").data)
    rec = {r.id: r for r in src}
    jpeg = np.asarray(Image.open(root / "images" / "a.jpg").convert("RGB"))
    assert np.array_equal(rec["a"].image, jpeg)
    assert np.abs(rec["a"].image.astype(int) - base).mean() < 12  # lossy (chroma subsampling), same picture
    assert np.array_equal(rec["b"].image, np.dstack([grey] * 3))
    assert np.array_equal(rec["c"].image, base)  # alpha dropped
    assert np.array_equal(rec["d"].image, np.dstack([grey] * 3))  # 16 -> 8 bit, not clipped


def test_refuge_training400_layout(tmp_path: Path) -> None:
    root = tmp_path / "refuge"
    written = make_refuge_training400(root, {"g0001": 1, "g0002": 1, "n0001": 0, "n0002": 0, "n0003": 0})
    src = refuge_source(params_for(tmp_path, source="refuge", path=str(root)).data)
    assert src.class_names == ["non-glaucoma", "glaucoma"] and src.mask_classes == ["background", "disc", "cup"]
    records = list(src)
    assert [r.id for r in records] == ["g0001", "g0002", "n0001", "n0002", "n0003"]  # no illustration
    assert [r.label for r in records] == [1, 1, 0, 0, 0]
    for r in records:
        image, mask = written[r.id]
        assert np.array_equal(r.image, image) and np.array_equal(r.mask, mask)


def test_refuge_mask_thresholds(tmp_path: Path) -> None:
    root = tmp_path / "refuge"
    make_refuge_training400(root, {"g0001": 1, "n0001": 0, "n0002": 0}, size=(2, 8))
    grey = np.array([[0, 5, 9, 10, 128, 245, 246, 255]] * 2, np.uint8)
    save(root / "Annotation-Training400" / "Disc_Cup_Masks" / "Glaucoma" / "g0001.bmp", grey)
    src = refuge_source(params_for(tmp_path, source="refuge", path=str(root), image_size=32).data)
    raw = src._read_mask(src.items[0][2])
    assert src._mask_classes(raw, src.items[0][2])[0].tolist() == [2, 2, 2, 1, 1, 1, 0, 0]


@pytest.mark.parametrize("header,value_pos,value_neg", [
    ("ImgName,Glaucoma Label", "1", "0"),
    ("id,label", "glaucoma", "non-glaucoma"),
    ("image_name,glaucoma", "True", "False"),
])
def test_refuge_flat_layout_with_label_csv(tmp_path: Path, header: str, value_pos: str, value_neg: str) -> None:
    root = tmp_path / "refuge"
    ids = {"V0001": value_pos, "V0002": value_neg, "V0003": value_neg, "V0004": value_pos}
    written = make_refuge_flat(root, ids, header=header)
    records = list(refuge_source(params_for(tmp_path, source="refuge", path=str(root)).data))
    assert [r.id for r in records] == sorted(ids)
    assert [r.label for r in records] == [1, 0, 0, 1]
    for r in records:
        assert np.array_equal(r.mask, written[r.id][1])


def test_refuge_flat_missing_label_and_bad_column(tmp_path: Path) -> None:
    root = tmp_path / "refuge"
    make_refuge_flat(root, {"V0001": "1", "V0002": "0"})
    save(root / "REFUGE-Validation400" / "V0009.png", rgb(32, 32, 9))
    with pytest.raises(DataError, match=r"V0009\.png: missing label"):
        refuge_source(params_for(tmp_path, source="refuge", path=str(root)).data)
    (root / "REFUGE-Validation400-GT" / "Glaucoma_label.csv").write_text("file,diagnosis\nV0001.jpg,1\n")
    with pytest.raises(DataError, match="no glaucoma label column"):
        refuge_source(params_for(tmp_path, source="refuge", path=str(root)).data)


def test_refuge_requires_masks_folder_and_path(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no Disc_Cup_Masks"):
        refuge_source(params_for(tmp_path, source="refuge", path=str(tmp_path / "empty")).data)
    with pytest.raises(ConfigError, match="data.path"):
        refuge_source(params_for(tmp_path, source="refuge", path="").data)
    with pytest.raises(DataError, match="not found"):
        refuge_source(params_for(tmp_path, source="refuge", path=str(tmp_path / "nope")).data)


def test_folder_rejects_bad_mask_values_mapping(tmp_path: Path) -> None:
    make_folder(tmp_path / "raw", {"a": "x", "b": "y", "c": "x"})
    with pytest.raises(ConfigError, match="mask_values"):
        folder_source(params_for(tmp_path, source="folder", path=str(tmp_path / "raw"), mask_values={0: 0, 1: 5}).data)
    src = folder_source(params_for(tmp_path, source="folder", path=str(tmp_path / "raw"), mask_values={0: 0, 1: 1},
                                   positive_class="y").data)
    with pytest.raises(DataError, match=r"a\.png: mask value\(s\) \[2\] not in data.mask_values"):
        list(src)
