"""uml: Uncertainty-informed Mutual Learning (Ren et al., MICCAI 2023) as a DVC + Ray pipeline."""

import os

# albumentations checks online for a newer release when imported; nothing here may reach out.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"
