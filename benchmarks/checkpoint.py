"""What a checkpoint costs the training loop: ``train.checkpoint_upload`` sync against async.

One Ray Train worker (CPU) holds the training state of the published recipe's model
(``configs/paper-gpu.yaml``, random weights: nothing is downloaded; Adam's moments filled by one
step, so the checkpoint has its real size, about 470 MB). It then runs ``--epochs`` epochs whose
training is a ``--train-seconds`` pause (a stand-in for GPU work, which a background upload can
overlap) and reports each through the real ``uml.train.worker.report_epoch``, with a checkpoint
every epoch. Per mode the table gives how long each report blocks the loop (mean over the epochs)
and the run's wall time, which for ``async`` includes waiting for the last upload.

Storage: a local folder (``--storage local``, the default) and, with ``--storage s3``, an S3 server
on 127.0.0.1 (moto, from the test extras), reached as a user reaches MinIO::

    python benchmarks/checkpoint.py
    python benchmarks/checkpoint.py --storage local s3 --epochs 3 --train-seconds 8
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

from _machine import command_line, cpu_name  # noqa: E402

PAUSE_ENV = "UML_BENCH_EPOCH_PAUSE_S"


def checkpoint_loop(config: dict[str, Any]) -> None:
    """The Ray Train loop: the real state and ``report_epoch``, the training replaced by a pause."""
    import torch

    from uml.config import parse_params
    from uml.train.worker import build_state, report_epoch

    params = parse_params(config["params"])
    # The local Ray instance's workers inherit the driver's environment (set in main).
    epochs, pause = config["epochs"], float(os.environ[PAUSE_ENV])
    state = build_state(params, config["model"], epochs, torch.device("cpu"))
    for p in state.model.parameters():  # one step: Adam's two moments exist, as in any checkpoint after epoch 1
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    state.optimizer.step()
    blocked = []
    for epoch in range(epochs):
        time.sleep(pause)
        row = {"epoch": epoch, "val/score": float(epoch), "lr": params.train.lr, "epoch_seconds": float(pause),
               "images_per_second": 0.0}
        state.history.append(row)
        started = time.perf_counter()
        report_epoch(state, row, epochs, 0, params)
        blocked.append(time.perf_counter() - started)
    size = sum(t.numel() * t.element_size() for t in state.net.state_dict().values())
    size += sum(t.numel() * t.element_size() for s in state.optimizer.state.values() for t in s.values() if torch.is_tensor(t))
    out = Path(params.data.root) / f"blocked-{params.train.checkpoint_upload}.json"
    out.write_text(json.dumps({"blocked": blocked, "state_bytes": size}))


def _params(root: Path, storage: str, mode: str):
    from uml.config import load_params

    params = load_params(REPO / "configs" / "paper-gpu.yaml")
    return params.with_overrides({
        "data.root": str(root), "ray.storage_path": storage, "ray.use_gpu": False, "ray.num_workers": 1,
        "ray.resources_per_worker": {"CPU": 1}, "model.pretrained": False, "train.checkpoint_upload": mode,
        "train.checkpoint_every": 1,
    })


def _moto_s3(work: Path) -> tuple[str, Any]:
    """A moto S3 server on loopback with one bucket; the storage URI that points at it."""
    import pyarrow.fs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_EC2_METADATA_DISABLED": "true"})
    fs = pyarrow.fs.S3FileSystem(endpoint_override=f"{host}:{port}", scheme="http", region="us-east-1",
                                 access_key="bench", secret_key="bench", allow_bucket_creation=True)
    fs.create_dir("bench")
    return f"s3://bench/uml?endpoint_override={host}:{port}&scheme=http&region=us-east-1", server


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--storage", nargs="+", choices=["local", "s3"], default=["local"])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-seconds", type=float, default=8.0, help="the pause standing in for an epoch's training")
    args = parser.parse_args(argv)

    import logging

    from uml.train.cluster import ray_session
    from uml.train.trainer import model_config, run_trainer

    logging.basicConfig(level=logging.WARNING)
    os.environ[PAUSE_ENV] = str(args.train_seconds)
    rows = []
    with tempfile.TemporaryDirectory(prefix="uml-bench-ckpt-") as tmp:
        work = Path(tmp)
        for storage_kind in args.storage:
            server = None
            storage = str(work / "storage")
            if storage_kind == "s3":
                storage, server = _moto_s3(work)
            try:
                for mode in ("sync", "async"):
                    root = work / f"{storage_kind}-{mode}"
                    root.mkdir()
                    params = _params(root, storage, mode)
                    cfg = model_config(params, ["non-glaucoma", "glaucoma"], ["background", "disc", "cup"], 256)
                    with ray_session(params):
                        started = time.perf_counter()
                        run_trainer(params, name=f"bench-{storage_kind}-{mode}", model_cfg=cfg, epochs=args.epochs,
                                    num_workers=1, train_loop=checkpoint_loop)
                        wall = time.perf_counter() - started
                    measured = json.loads((root / f"blocked-{mode}.json").read_text())
                    blocked = measured["blocked"]
                    rows.append((storage_kind, mode, sum(blocked) / len(blocked), max(blocked), wall,
                                 measured["state_bytes"]))
                    print(f"{storage_kind} {mode}: report blocks {rows[-1][2]:.2f} s (max {rows[-1][3]:.2f}), "
                          f"run {wall:.1f} s", file=sys.stderr)
            finally:
                if server is not None:
                    server.stop()

    print(f"\n`{command_line()}` on {cpu_name()} ({os.cpu_count()} cores); paper preset state "
          f"{rows[0][5] / 1e6:.0f} MB (weights + Adam moments), {args.epochs} epochs of {args.train_seconds} s, "
          "a checkpoint every epoch\n")
    print("| storage | train.checkpoint_upload | report blocks the loop (s, mean / max) | run wall time (s) | blocking vs sync |")
    print("|---|---|---:|---:|---:|")
    sync_block = {storage: mean for storage, mode, mean, _, _, _ in rows if mode == "sync"}
    for storage, mode, mean, worst, wall, _ in rows:
        print(f"| {storage} | {mode} | {mean:.2f} / {worst:.2f} | {wall:.1f} | {mean / sync_block[storage]:.2f}× |")


if __name__ == "__main__":
    main()
