"""Reading image and mask files, and resizing them: every reader of ``uml`` comes here.

Outside :mod:`uml.data` so that ``uml predict`` does not import the data package (zarr, scipy).

Two readers, for two kinds of input:

- :func:`read_image` and :func:`read_mask_values`: the data importers (``prepare``), which read a
  data set someone chose to train on. Files up to :data:`MAX_IMAGE_PIXELS` are accepted (medical
  images can be large), JPEGs decode at a reduced scale when that still covers the target size,
  and images come back resized to the training size.
- :func:`read_rgb`: ``uml predict``, which reads any file it is handed. Pillow's own
  decompression-bomb limit applies, and multi-frame files, TIFF channel layouts Pillow would
  misread and floating-point pixels are refused (the ``uml.predict`` module docstring lists what
  is accepted).

Both convert to uint8 RGB the same way: 16-bit (and 32-bit integer) grayscale is scaled to 8 bit
by :func:`wide_grey_to_rgb` instead of clipped as Pillow's ``convert("RGB")`` would; grayscale is
replicated to three channels; alpha is dropped. Every image is resized by :func:`resize_image`
(area when shrinking, linear when enlarging, unless an exported model's metadata asks for another
method) and every mask by :func:`resize_mask` (nearest, pixel-centre aligned), so training,
evaluation and inference see the same pixels. Every problem raises
:class:`~uml.errors.DataError` naming the file.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from uml.errors import DataError

# Images beyond Pillow's default limit (~89 Mpx) are legitimate in medical imaging, but a
# hard cap still protects against decompression bombs. Applied only while the importers open a
# file: Pillow's limit is process-wide, and other readers (uml predict) keep the default.
MAX_IMAGE_PIXELS = 400_000_000

# Every model sees a uint8 RGB value v as v / PIXEL_MAX, in [0, 1]: training (on the device,
# uml.data.dataset.to_model_input), the export's parity check and its metadata's ``scale``, which
# uml evaluate and uml predict apply. The one definition of the model's input scale.
PIXEL_MAX = 255.0

# Resize method names (an exported model's ``preprocessing.resize``) -> OpenCV interpolation when
# the image shrinks / grows. "area" is what the importers use, so inference sees training's pixels.
ResizeMethod = Literal["area", "bilinear", "bicubic", "nearest"]
RESAMPLING: dict[ResizeMethod, tuple[int, int]] = {
    "area": (cv2.INTER_AREA, cv2.INTER_LINEAR),
    "bilinear": (cv2.INTER_LINEAR, cv2.INTER_LINEAR),
    "bicubic": (cv2.INTER_CUBIC, cv2.INTER_CUBIC),
    "nearest": (cv2.INTER_NEAREST_EXACT, cv2.INTER_NEAREST_EXACT),
}

# 16/32-bit integer grayscale Pillow modes (scaled to 8 bit by wide_grey_to_rgb).
WIDE_GREY_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
# Pillow modes that read_rgb converts to RGB with Pillow itself.
_EIGHT_BIT_MODES = frozenset({"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr"})
# TIFF tag 277: samples per pixel; what Pillow's mode must have for the file to be read faithfully.
_TIFF_SAMPLES_PER_PIXEL = 277


# ------------------------------------------------------------------------------ conversion, resizing
def wide_grey_to_rgb(image: Image.Image) -> np.ndarray:
    """A loaded 16-bit (or 32-bit integer) grayscale image as uint8 RGB (H, W, 3), scaled to 8
    bit rather than clipped. A 32-bit ``I`` image whose values fit in 8 bits is taken as 8-bit."""
    grey = np.asarray(image, dtype=np.float64)
    peak = 65535.0 if image.mode != "I" or grey.max() > 255 else 255.0
    grey8 = np.clip(grey * (255.0 / peak) + 0.5, 0, 255).astype(np.uint8)
    return np.repeat(grey8[..., None], 3, axis=-1)


def resize_image(image: np.ndarray, size: int, method: str = "area") -> np.ndarray:
    """uint8 RGB (H, W, 3) -> (size, size, 3); ``method`` is a key of :data:`RESAMPLING` (by
    default area when shrinking, linear when enlarging)."""
    height, width = image.shape[:2]
    if (height, width) == (size, size):
        return image
    shrink, grow = RESAMPLING[method]
    interpolation = shrink if size < max(height, width) else grow
    return cv2.resize(np.ascontiguousarray(image), (size, size), interpolation=interpolation)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Resize a class-index mask to (size, size) with nearest-neighbour (pixel-centre aligned)."""
    if mask.shape[:2] == (size, size):
        return mask
    return cv2.resize(mask, (size, size), interpolation=cv2.INTER_NEAREST_EXACT)


# ------------------------------------------------------------------------------ the importers' reader
def _open(path: Path, what: str) -> Image.Image:
    default_limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    try:
        img = Image.open(path)
    except FileNotFoundError:
        raise DataError(f"{path}: {what} file not found") from None
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: cannot read {what} (corrupt, unsupported or too large: {exc})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = default_limit
    return img


def _load(img: Image.Image, path: Path, what: str) -> None:
    # Pillow decodes lazily; load() is where truncated or corrupt data shows up.
    try:
        img.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: cannot decode {what} (corrupt or truncated: {exc})") from None


def read_image(path: Path, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode ``path`` as RGB uint8 resized to (size, size); also returns the original (h, w)."""
    with _open(path, "image") as img:
        original = (img.height, img.width)
        if img.format == "JPEG":
            # Let libjpeg decode at 1/2, 1/4 or 1/8 scale when that still covers the target size:
            # REFUGE's 2124 px JPEGs then decode several times faster. Area resizing follows.
            img.draft("RGB", (size, size))
        _load(img, path, "image")
        if img.mode in WIDE_GREY_MODES:
            arr = wide_grey_to_rgb(img)
        elif img.mode == "F":
            raise DataError(f"{path}: floating-point images are not supported (convert to 8 or 16 bit)")
        else:
            arr = np.asarray(img.convert("RGB"))
    return resize_image(np.ascontiguousarray(arr), size), original


def read_mask_values(path: Path, *, grey: bool) -> np.ndarray:
    """Decode a mask as a 2-D integer array of its stored values.

    ``grey=True`` (REFUGE) returns grey levels, resolving palettes to their colours. Otherwise
    palette images give their indices (the usual way class masks are stored) and colour images
    must have equal channels.
    """
    with _open(path, "mask") as img:
        _load(img, path, "mask")
        if grey:
            arr = np.asarray(img if img.mode in ("L", "I;16", "I") else img.convert("L"))
        elif img.mode in ("RGB", "RGBA", "LA"):
            rgb = np.asarray(img)[..., : (1 if img.mode == "LA" else 3)]
            if not (rgb == rgb[..., :1]).all():
                raise DataError(
                    f"{path}: colour mask (channels differ); store class indices in one channel "
                    "(or grey levels mapped by data.mask_values)"
                )
            arr = rgb[..., 0]
        elif img.mode == "1":
            arr = np.asarray(img, dtype=np.uint8)
        elif img.mode in ("L", "P", "I;16", "I;16L", "I;16B", "I"):
            arr = np.asarray(img)
        else:
            raise DataError(f"{path}: unsupported mask mode {img.mode!r} (use 8-bit grey or palette PNG)")
    return np.ascontiguousarray(arr)


# ------------------------------------------------------------------------------ uml predict's reader
def read_rgb(path: str | Path) -> np.ndarray:
    """Read any image file handed to ``uml predict`` as uint8 RGB (H, W, 3), at full size."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with warnings.catch_warnings():
            # Between Pillow's limit and twice it Pillow only warns; such an image is read (memory
            # stays bounded by its size). Above twice the limit, open() raises.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
    except Image.DecompressionBombError as exc:
        raise DataError(f"{path}: too large to read safely ({exc}); downscale it first") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as exc:
        raise DataError(f"{path}: not a readable image ({exc})") from None
    try:
        with image:
            frames = getattr(image, "n_frames", 1)
            if frames > 1:
                raise DataError(f"{path}: has {frames} frames (an image stack); expected a single 2-D image")
            if image.format == "TIFF":
                samples = image.tag_v2.get(_TIFF_SAMPLES_PER_PIXEL, 1)
                if samples != len(image.getbands()):
                    raise DataError(
                        f"{path}: has {samples} channels per pixel; expected 1 (grayscale), 2 (grayscale + alpha), "
                        "3 (RGB) or 4 (RGBA)"
                    )
            image.load()
            mode = image.mode
            if mode in WIDE_GREY_MODES:
                return wide_grey_to_rgb(image)
            if mode not in _EIGHT_BIT_MODES:
                raise DataError(
                    f"{path}: pixel mode {mode!r} is not supported; expected 8-bit grayscale/RGB(A) or 16-bit grayscale"
                )
            return np.asarray(image if image.mode == "RGB" else image.convert("RGB"), dtype=np.uint8)
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, MemoryError) as exc:
        # Pillow raises these for unknown formats and truncated or corrupt files.
        raise DataError(f"{path}: not a readable image ({type(exc).__name__}: {exc})") from None
