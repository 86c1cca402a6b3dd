"""The shared entry point of the ``pipeline/<stage>.py`` modules: parse ``--params``, load and
validate the params through the one loader, run the stage, turn user errors into a clear message
and a non-zero exit."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from uml.config import DEFAULT_PARAMS, Params, load_params, resolve_path
from uml.errors import ConfigError, UMLError
from uml.objectstore import describe, is_uri

# albumentations otherwise checks online for a newer version at import.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


# Ray's job manager gives the entrypoint of `ray job submit` its job config in this variable
# (ray._private.runtime_env.constants.RAY_JOB_CONFIG_JSON_ENV_VAR; read by its ray.init), with
# the submission id under metadata.job_submission_id.
RAY_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
# DVC names the stage it runs in every stage command's environment (dvc.env.DVC_STAGE).
DVC_STAGE_ENV = "DVC_STAGE"


def submitted_job_id(environ: Mapping[str, str] = os.environ) -> str | None:
    """The submission id when this process is the entrypoint of a Ray job, else None."""
    raw = environ.get(RAY_JOB_CONFIG_ENV)
    if not raw:
        return None
    try:
        metadata = json.loads(raw).get("metadata") or {}
    except (ValueError, AttributeError):
        metadata = {}
    return str(metadata.get("job_submission_id") or "(id unknown)")


def check_job_paths(params: Params, environ: Mapping[str, str] = os.environ) -> None:
    """Inside a Ray job, refuse ``dvc repro`` and a relative ``data.root`` or ``ray.storage_path``.

    The job runs in a temporary copy of the uploaded working dir on the head node: git-ignored
    data was not uploaded, outputs vanish with the copy, and no other node sees it."""
    job = submitted_job_id(environ)
    if job is None:
        return
    if environ.get(DVC_STAGE_ENV):
        raise ConfigError(
            f"stage '{environ[DVC_STAGE_ENV]}' of dvc repro runs inside the Ray job {job} (ray job submit), whose working "
            f"directory ({Path.cwd()}) is a temporary copy of the uploaded code that Ray deletes when the job ends: "
            "dvc.lock and the outputs DVC tracks would go with it. Run dvc repro from a checkout on storage the "
            "nodes share, with the stages joining the cluster: RAY_ADDRESS=<head>:6379 RAY_AUTH_MODE=token dvc repro "
            "(docs/how-to/ray-cluster.md). Single stages can still be submitted as jobs.")
    paths = {"data.root": params.data.root, "ray.storage_path": params.ray.storage_path}
    if is_uri(params.data.root):  # the stages' own files go to data.local_root instead
        paths["data.local_root"] = params.data.local_root
    relative = {key: value for key, value in paths.items()
                if value and "://" not in value and not Path(value).expanduser().is_absolute()}
    if relative:
        named = ", ".join(f"{key} '{value}'" for key, value in relative.items())
        raise ConfigError(
            f"{params._source}: {named} {'is' if len(relative) == 1 else 'are'} relative, and this stage runs inside the Ray job {job} (ray job submit), "
            f"whose working directory ({Path.cwd()}) is a temporary copy of the uploaded code on the head node: "
            "git-ignored data is not in it, outputs written there are lost, and other nodes cannot see it. Set "
            f"{' and '.join(relative)} to an absolute path on storage every node mounts (e.g. /mnt/shared/uml/data; "
            "ray.storage_path may also be s3://... or gs://...).")


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
        check_job_paths(params)
        if is_uri(params.data.root):
            logging.getLogger(__name__).info(
                "data.root is on object storage (%s): the store the nodes read is there; this stage's own files "
                "(models, reports, plots, logs) go to %s (data.local_root)", describe(params.data.root),
                resolve_path(params))
        fn(params)
    except UMLError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 1
    logging.getLogger(__name__).info("done in %.1f s", time.perf_counter() - start)
    return 0
