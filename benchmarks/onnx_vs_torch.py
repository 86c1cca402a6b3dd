"""Inference on CPU: onnxruntime against eager torch, batch-1 latency and batch-8 throughput.

    python benchmarks/onnx_vs_torch.py                        # small at 128 + paper at 256, 2 threads (~3 min on 2 cores)
    python benchmarks/onnx_vs_torch.py --skip-paper --iters 30
    python benchmarks/onnx_vs_torch.py --iters 2 --warmup 0 --paper-iters 1  # smoke test (~1.5 min)

Both sides run the deployment graph with the same number of threads: eager torch calls
``model.infer`` (eval mode, ``torch.no_grad()``, ``torch.set_num_threads(--threads)``);
onnxruntime runs the file written by ``uml.export.export_onnx`` (CPUExecutionProvider,
``intra_op_num_threads = --threads``, via ``uml.export.session``). The models are randomly
initialised (weights do not change the cost). Before timing, the outputs of both on the same
input are compared (max abs diff over all outputs); the script stops if that exceeds ``--atol``.

Each time is the median of ``--iters`` runs (``--paper-iters`` for the paper preset) after the
parity run and ``--warmup`` more untimed runs. The engines are timed one after the other, not
interleaved: onnxruntime's default spin-waiting threads would slow a torch call made right after
``sess.run`` (2x on 2 cores). onnxruntime keeps its default session options, as the evaluate stage
does. The ratio column is torch time / onnxruntime time (> 1: onnxruntime is faster), both from
the same run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

from _machine import command_line, cpu_name  # noqa: E402
from uml.export import INPUT_NAME, export_onnx, session  # noqa: E402
from uml.models import PRESETS, build_model  # noqa: E402


def median_seconds(fn, warmup: int, iters: int) -> float:
    """Median seconds per call of ``fn`` after ``warmup`` untimed calls.

    Each engine is timed in its own block rather than interleaved with the other: onnxruntime's
    intra-op threads keep spinning for a moment after ``run`` returns (its default), and on a
    2-core machine that doubles the time of a torch call made right after.
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(preset: str, size: int, folder: Path, *, threads: int, warmup: int, iters: int, atol: float) -> list[dict]:
    torch.manual_seed(0)
    model = build_model(preset, image_size=size).eval()
    path = folder / f"{preset}.onnx"
    print(f"  {preset}: exporting to ONNX ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    export_onnx(model, path)
    export_seconds = time.perf_counter() - start
    sess = session(path, threads=threads)
    names = [o.name for o in sess.get_outputs()]
    rows = []
    for batch in (1, 8):
        x = np.random.default_rng(batch).random((batch, 3, size, size), dtype=np.float32)
        xt = torch.from_numpy(x)

        def run_torch() -> dict[str, torch.Tensor]:
            with torch.no_grad():
                return model.infer(xt)

        def run_ort() -> list[np.ndarray]:
            return sess.run(names, {INPUT_NAME: x})

        reference = run_torch()
        got = dict(zip(names, run_ort()))
        diff = max(float(np.abs(got[n] - reference[n].numpy()).max()) for n in names)
        if not diff <= atol:  # also catches NaN
            raise SystemExit(f"{preset}, batch {batch}: onnxruntime and torch outputs differ by {diff:.3e} > --atol {atol:g}; "
                             "not timing a graph that computes something else")
        print(f"  {preset}: timing batch {batch} (max abs diff {diff:.1e}) ...", file=sys.stderr, flush=True)
        t_ort = median_seconds(run_ort, warmup, iters)
        t_torch = median_seconds(run_torch, warmup + 1, iters)  # one more warm-up: lets ORT's spinning threads settle
        rows.append({"preset": preset, "size": size, "batch": batch, "diff": diff, "export_s": export_seconds,
                     "onnx_mb": path.stat().st_size / 1e6, "torch": t_torch, "ort": t_ort})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch threads = onnxruntime intra-op threads")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before each measurement (besides the parity run)")
    parser.add_argument("--small-size", type=int, default=PRESETS["small"]["image_size"])
    parser.add_argument("--iters", type=int, default=10, help="small: timed runs per engine and batch size")
    parser.add_argument("--skip-paper", action="store_true", help="measure the small preset only")
    parser.add_argument("--paper-size", type=int, default=256)
    parser.add_argument("--paper-iters", type=int, default=2, help="paper: timed runs per engine and batch size")
    parser.add_argument("--paper-warmup", type=int, default=0, help="paper: untimed runs (besides the parity run)")
    parser.add_argument("--atol", type=float, default=1e-4, help="largest accepted |onnxruntime - torch| (export.parity_atol)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="uml-onnx-bench-") as tmp:
        rows += measure("small", args.small_size, Path(tmp), threads=args.threads, warmup=args.warmup,
                        iters=args.iters, atol=args.atol)
        if not args.skip_paper:
            rows += measure("paper", args.paper_size, Path(tmp), threads=args.threads, warmup=args.paper_warmup,
                            iters=args.paper_iters, atol=args.atol)
    elapsed = time.perf_counter() - started

    print(f"\n`{command_line()}`\n")
    print(f"CPU: {cpu_name()}, {os.cpu_count()} logical CPUs; {args.threads} threads; torch {torch.__version__}, "
          f"onnxruntime {ort.__version__}; {elapsed:.0f} s\n")
    print("| preset | input | batch | measure | torch | onnxruntime | torch / onnxruntime | max abs diff |")
    print("|---|---|---:|---|---:|---:|---:|---:|")
    for r in rows:
        if r["batch"] == 1:
            measure_name, t, o = "latency (ms)", f"{r['torch'] * 1e3:.1f}", f"{r['ort'] * 1e3:.1f}"
        else:
            measure_name, t, o = "throughput (img/s)", f"{r['batch'] / r['torch']:.2f}", f"{r['batch'] / r['ort']:.2f}"
        print(f"| {r['preset']} | {r['size']}² | {r['batch']} | {measure_name} | {t} | {o} | "
              f"{r['torch'] / r['ort']:.2f}x | {r['diff']:.1e} |")
    print("\n" + "; ".join(f"{r['preset']}: ONNX file {r['onnx_mb']:.1f} MB, export {r['export_s']:.0f} s"
                           for r in rows if r["batch"] == 1))


if __name__ == "__main__":
    main()
