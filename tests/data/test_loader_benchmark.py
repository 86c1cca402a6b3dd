"""benchmarks/loader.py runs end to end on a tiny store (a smoke test: no speed is asserted)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_loader_benchmark_prints_both_tables_and_the_batch_bytes(capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    sys.modules.pop("loader", None)
    import loader

    loader.main(["--num-images", "8", "--size", "32", "--original-size", "48", "--workers", "0", "1",
                 "--epochs", "1", "--model-rate", "gpu=1000", "--files"])
    out = capsys.readouterr().out
    # 8 images of 32 x 32: uint8 image + mask 8 * 32 * 32 * (3 + 1) bytes; float32 image + int64 mask
    # 8 * 32 * 32 * (3 * 4 + 8): five times as many.
    sizes = re.search(r"uint8 ([\d.]+) MiB, float32/int64 ([\d.]+) MiB, ([\d.]+)x", out)
    assert sizes and float(sizes[1]) == round(8 * 32 * 32 * 4 / 2**20, 2) and float(sizes[3]) == 5.0
    assert re.search(r"^\| 0 \(main process\) \| \d+ \| - \| \d+ \| [\d.]+x \|$", out, re.M)
    assert re.search(r"^\| 1 \| \d+ \| \d+ \| \d+ \| [\d.]+x \|$", out, re.M)
    assert re.search(r"^\| gpu \| 1000 \| \d+ \|$", out, re.M)
    assert "| zarr store + augment (`SegClsDataset`) |" in out
