"""The classes of fundus data (the synthetic generator and REFUGE), defined once.

A module of its own, importing nothing, so that the params schema, the data sources and the
metrics can all use it without importing each other.
"""

from __future__ import annotations

# Mask class 1 is the disc rim, 2 the cup; "disc" metrics are computed on rim ∪ cup downstream,
# as the REFUGE challenge does.
FUNDUS_MASK_CLASSES: tuple[str, ...] = ("background", "disc", "cup")
FUNDUS_CLASS_NAMES: tuple[str, ...] = ("non-glaucoma", "glaucoma")
# The class that the binary metrics (sensitivity, F1, AUC) score: glaucoma.
FUNDUS_POSITIVE_CLASS: int = FUNDUS_CLASS_NAMES.index("glaucoma")
