"""Import timm beside a CPU-only torch.

timm imports torchvision at import time (for ``FrozenBatchNorm2d``). On Linux, PyPI's torchvision
wheels are built against the CUDA torch. Next to the CPU build of the same torch release
(``torch==2.13.0+cpu``, what ``constraints.txt`` pins), their C extension cannot load.
torchvision then fails at import while registering fake kernels for its ``nms`` and ``qnms``
operators, which the missing extension would have defined. Every other registration in
torchvision is guarded by ``extension._has_ops()``.

uml uses none of torchvision's C++ operators. So when (and only when) that exact failure
happens, we declare the two operator schemas, without any kernel, and import again: the
pure-Python part of torchvision loads, and calling ``torchvision.ops.nms`` still fails loudly.
With a matching torchvision (e.g. CUDA torch on a GPU node) this module does nothing.
"""

from __future__ import annotations

import sys

import torch

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
# Kept alive for the process: dropping the Library object would deregister the schemas.
_torchvision_lib: torch.library.Library | None = None


def import_timm():
    """Return the ``timm`` module, making torchvision importable first if needed."""
    global _torchvision_lib
    try:
        import torchvision  # noqa: F401
    except RuntimeError as exc:
        if "torchvision::nms" not in str(exc):
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        _torchvision_lib = torch.library.Library("torchvision", "DEF")
        for schema in _SCHEMAS.values():
            _torchvision_lib.define(schema)
        import torchvision  # noqa: F401
    import timm

    return timm
