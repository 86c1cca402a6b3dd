"""Inference latency (batch 1) and throughput (batch 8): onnxruntime against eager torch on CPU.

    python benchmarks/onnx_vs_torch.py                    # small at 128 and paper at 256, 2 threads
    python benchmarks/onnx_vs_torch.py --iters 20 --skip-paper

Both run the deployment graph (``UMLNet.infer``: class and pixel probabilities and uncertainties)
with the same number of threads; the ONNX file comes from ``uml.export.export_onnx``. Outputs are
compared before timing. Reports medians and the ratio torch time / onnxruntime time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from uml.export import INPUT_NAME, export_onnx
from uml.models import build_model


def _median_seconds(fn, iters: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--paper-iters", type=int, default=3)
    parser.add_argument("--skip-paper", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    presets = [("small", 128, args.iters)] + ([] if args.skip_paper else [("paper", 256, args.paper_iters)])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset, size, iters in presets:
            print(f"exporting and timing {preset} at {size} px ...", file=sys.stderr, flush=True)
            model = build_model(preset, image_size=size).eval()
            path = Path(tmp) / f"{preset}.onnx"
            export_onnx(model, path)
            options = ort.SessionOptions()
            options.intra_op_num_threads = args.threads
            sess = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
            names = [o.name for o in sess.get_outputs()]
            for batch in (1, 8):
                x = np.random.default_rng(0).random((batch, 3, size, size), dtype=np.float32)
                xt = torch.from_numpy(x)
                with torch.no_grad():
                    reference = model.infer(xt)
                got = dict(zip(names, sess.run(names, {INPUT_NAME: x})))
                diff = max(float(np.abs(got[n] - reference[n].numpy()).max()) for n in names)

                def run_torch():
                    with torch.no_grad():
                        model.infer(xt)

                t_torch = _median_seconds(run_torch, iters)
                t_ort = _median_seconds(lambda: sess.run(names, {INPUT_NAME: x}), iters)
                rows.append((preset, size, batch, t_torch, t_ort, diff))

    print(f"\n`python benchmarks/onnx_vs_torch.py {' '.join(argv if argv is not None else sys.argv[1:])}` "
          f"(torch {torch.__version__}, onnxruntime {ort.__version__}, {args.threads} threads)\n")
    print("| preset | input | batch | torch | onnxruntime | torch / onnxruntime | max abs diff |")
    print("|---|---|---|---|---|---|---|")
    for preset, size, batch, t_torch, t_ort, diff in rows:
        torch_value = f"{t_torch * 1e3:.0f} ms" if batch == 1 else f"{batch / t_torch:.1f} img/s"
        ort_value = f"{t_ort * 1e3:.0f} ms" if batch == 1 else f"{batch / t_ort:.1f} img/s"
        print(f"| {preset} | {size}² | {batch} | {torch_value} | {ort_value} | {t_torch / t_ort:.2f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
