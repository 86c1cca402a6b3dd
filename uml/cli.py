"""The ``uml`` console script.

``uml predict IMAGE... --model data/models/model.onnx --out DIR`` runs the exported model on image
files (any size; see :mod:`uml.predict` for the accepted formats) and writes, per image,
``<stem>.json`` and ``<stem>_overlay.png`` into ``DIR``. ``metadata.json`` is read from next to the
model. ``--provider`` chooses where onnxruntime runs (:func:`uml.onnx_model.choose_providers`:
``auto``, the default, takes the GPU when it can); stderr says which it got. Exit status: 0 when every image was predicted, 1 when the model is unusable or any image
failed (the others are still written), 2 for a command-line usage error.

``uml params FILE [--out PATH]`` prints (or writes) every params key resolved from FILE, keys it
leaves out taking the schema's defaults: how an overrides file such as ``configs/paper-gpu.yaml``
becomes the full ``params.yaml`` that ``dvc repro`` reads. ``uml params FILE --dvc-set`` prints
instead the ``dvc exp run`` arguments (``-S key=value ...``, shell-quoted) that turn the default
params into FILE's, so that a recipe runs as a DVC experiment without overwriting the committed
``params.yaml``::

    eval "dvc exp run --name paper $(uml params configs/paper-gpu.yaml --dvc-set)"

Exit status 1 for an invalid FILE.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

# albumentations (imported by sibling modules) otherwise checks online for a newer version.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="uml", description="Uncertainty-informed mutual learning: inference tools.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    predict = commands.add_parser(
        "predict",
        help="classify and segment image files with an exported ONNX model",
        description="Write <stem>.json (class, probability, uncertainty, vCDR, areas) and <stem>_overlay.png per image.",
    )
    predict.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, TIFF, ...; any size)")
    predict.add_argument("--model", default="data/models/model.onnx", help="ONNX model, metadata.json beside it (default: %(default)s)")
    predict.add_argument("--metadata", default=None, help="metadata file (default: metadata.json next to the model)")
    predict.add_argument("--out", required=True, help="output folder (created if missing)")
    predict.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: 2)")
    predict.add_argument("--provider", choices=["auto", "cpu", "cuda"], default="auto",
                         help="where onnxruntime runs the model: auto (CUDA when onnxruntime has it and a GPU is "
                              "visible, else the CPU), cpu, or cuda (an error where CUDA cannot run) "
                              "(default: %(default)s)")
    predict.add_argument("--workers", type=int, default=0,
                         help="cut the files into this many shards, each predicted by a Ray task on the cluster "
                              "RAY_ADDRESS names, else on a local Ray instance on 127.0.0.1; the files and --out must be "
                              "at the same path on every node, the model goes through Ray's object store "
                              "(default: %(default)s, in this process)")
    predict.add_argument("--gpus-per-worker", type=float, default=0.0,
                         help="GPUs each of those Ray tasks asks for, e.g. 0.25 (default: %(default)s)")
    params = commands.add_parser(
        "params",
        help="resolve a params file against the schema's defaults",
        description="Print every params key: FILE's values, and the schema's defaults for the keys FILE leaves out.",
    )
    params.add_argument("file", metavar="FILE", help="a params file, complete or partial (e.g. configs/paper-gpu.yaml)")
    output = params.add_mutually_exclusive_group()
    output.add_argument("--out", default=None, help="write here (atomically) instead of printing, e.g. params.yaml")
    output.add_argument("--dvc-set", action="store_true",
                        help="print the `dvc exp run` arguments (-S key=value ...) that turn the defaults into FILE's "
                             "values, e.g. eval \"dvc exp run $(uml params FILE --dvc-set)\"")
    return parser


def _params(args: argparse.Namespace) -> int:
    from uml.config import dump_params, dvc_set_overrides, load_params
    from uml.errors import UMLError

    try:
        params = load_params(args.file)
        if args.dvc_set:
            overrides = dvc_set_overrides(params)
        else:
            text = dump_params(params, header=f"Resolved from {args.file} by `uml params`; "
                               "keys it leaves out take the schema's defaults (uml/config.py).")
    except UMLError as exc:
        print(f"uml params: error: {exc}", file=sys.stderr)
        return 1
    if args.dvc_set:
        import shlex

        print(" ".join(f"-S {shlex.quote(override)}" for override in overrides))
        return 0
    if args.out is None:
        sys.stdout.write(text)
        return 0
    from uml.atomic import write_text_replacing

    write_text_replacing(args.out, text)
    print(f"uml params: wrote {args.out}", file=sys.stderr)
    return 0


def _predict_on_ray(model, args: argparse.Namespace) -> tuple[list[dict], list[str]]:
    """``uml predict --workers N``: :func:`uml.predict.predict_files_on_ray` in a Ray session
    (the cluster RAY_ADDRESS names, else a local instance on loopback without a dashboard)."""
    from uml.config import Params
    from uml.predict import predict_files_on_ray
    from uml.train.cluster import ray_session

    params = Params()
    params = params.model_copy(update={"ray": params.ray.model_copy(update={"include_dashboard": False})})
    with ray_session(params):
        return predict_files_on_ray(model, args.images, args.out, args.workers, args.gpus_per_worker, args.provider)


def _predict(args: argparse.Namespace) -> int:
    from uml.errors import DataError, UMLError
    from uml.onnx_model import OnnxModel
    from uml.predict import predict_files

    try:
        model = OnnxModel(args.model, args.metadata, threads=args.threads, provider=args.provider,
                          setting="--provider")
        print(f"uml predict: onnxruntime runs on {model.placement}", file=sys.stderr)
        if args.workers < 0 or args.gpus_per_worker < 0:
            raise DataError(f"--workers and --gpus-per-worker must be >= 0, got {args.workers} and {args.gpus_per_worker}")
        if args.workers:
            records, errors = _predict_on_ray(model, args)
        else:
            records, errors = predict_files(model, args.images, args.out)
    except UMLError as exc:
        print(f"uml predict: error: {exc}", file=sys.stderr)
        return 1
    if errors:
        print(f"uml predict: {len(errors)} of {len(records) + len(errors)} images failed", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (``argparse`` usage errors exit with 2)."""
    args = _parser().parse_args(argv)
    if args.command == "predict":
        return _predict(args)
    if args.command == "params":
        return _params(args)
    raise AssertionError(f"unhandled command {args.command}")  # argparse only accepts known commands


if __name__ == "__main__":
    raise SystemExit(main())
