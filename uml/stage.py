"""The shared entry point of the ``pipeline/<stage>.py`` modules: parse ``--params``, load and
validate the params through the one loader, run the stage, turn user errors into a clear message
and a non-zero exit."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable

from uml.config import DEFAULT_PARAMS, Params, load_params
from uml.errors import UMLError

# albumentations otherwise checks online for a newer version at import.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def stage_parser(name: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m pipeline.{name}", description=description)
    parser.add_argument("--params", default=DEFAULT_PARAMS, help="params file (default: %(default)s)")
    return parser


def run_stage(name: str, description: str, fn: Callable[[Params], object], argv: list[str] | None = None) -> int:
    """Run ``fn(params)`` as stage ``name``; returns the process exit code."""
    args = stage_parser(name, description).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"[{name}] %(message)s", stream=sys.stdout)
    start = time.perf_counter()
    try:
        params = load_params(args.params)
        fn(params)
    except UMLError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 1
    logging.getLogger(__name__).info("done in %.1f s", time.perf_counter() - start)
    return 0
