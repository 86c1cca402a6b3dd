"""uml.plots: the figures are drawn on matplotlib Figure objects, never through pyplot."""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap

import numpy as np
from PIL import Image

from uml.plots import overlay_figure


def _disc_and_cup(size: int) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    r2 = (yy - size / 2) ** 2 + (xx - size / 2) ** 2
    return (r2 < (size / 4) ** 2).astype(np.uint8) + (r2 < (size / 8) ** 2).astype(np.uint8)


def test_overlay_has_a_heat_map_panel_only_with_an_uncertainty_map():
    image = np.full((120, 80, 3), 90, np.uint8)  # larger than the masks: they are stretched over it
    mask = _disc_and_cup(32)
    sizes = {}
    for name, uncertainty in (("with", np.random.default_rng(0).random((32, 32))), ("without", None)):
        stream = io.BytesIO()
        overlay_figure(stream, image, mask, uncertainty, ["background", "disc", "cup"], "title")
        with Image.open(io.BytesIO(stream.getvalue())) as png:
            assert png.format == "PNG"
            sizes[name] = png.size
    # 5 x 5.4 inches per panel at 100 dpi.
    assert sizes == {"with": (1000, 540), "without": (500, 540)}


def test_drawing_never_loads_pyplot():
    script = textwrap.dedent("""
        import io, sys
        import numpy as np
        import uml.evaluate, uml.predict
        from uml.plots import overlay_figure, panel_figure
        overlay_figure(io.BytesIO(), np.zeros((8, 8, 3), np.uint8), np.ones((8, 8), np.uint8), np.zeros((8, 8)),
                       ["background", "disc", "cup"], "t")
        print("matplotlib.pyplot" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
