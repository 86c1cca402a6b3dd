"""Host reads per training step: how often the step reads a tensor value back to Python.

Every ``.item()``, ``int()``, ``float()`` or ``bool()`` of a tensor ends in the op
``aten._local_scalar_dense``; on a GPU each one blocks the host until the device has caught up.
This script counts those calls (a ``TorchDispatchMode``) while ``uml.train.worker.train_one_epoch``
runs, the real training loop, on a tiny synthetic store (64 px, the params.yaml model), and
splits them:

- *Adam step counters*: Adam (``capturable=False``) reads each parameter's ``step`` with
  ``.item()``; those counters live on the CPU, so they are no device sync. They would be if a
  resume moved them to the GPU (``map_location=<device>``, as before commit 711b272): the table
  gives their number per step for the small and the paper preset;
- *other reads per step*: everything else inside the step loop (e.g. a label range check);
- *other reads per epoch*: once per epoch (the mean losses, the DataLoader's seed).

Per step and per epoch are told apart by running one epoch of 1 and one of 3 batches.
``--tree`` runs the same measurement against another checkout of the repository (e.g. a
``git worktree`` of an older commit), for a before/after comparison:

    python benchmarks/host_syncs.py
    git worktree add /tmp/wt-before aff7876 && python benchmarks/host_syncs.py --tree /tmp/wt-before
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
HERE = Path(__file__).resolve().parent


def _import_tree(tree: Path) -> None:
    """Import ``uml`` from ``tree`` (this checkout by default)."""
    sys.path.insert(0, str(tree))
    import uml

    if not Path(uml.__file__).resolve().is_relative_to(tree):
        raise SystemExit(f"uml was imported from {uml.__file__}, not from {tree}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", type=Path, default=HERE.parent, help="checkout whose uml is measured")
    args = parser.parse_args(argv)
    tree = args.tree.resolve()
    _import_tree(tree)

    import ray.train.torch
    import torch
    import yaml
    from torch.utils._python_dispatch import TorchDispatchMode

    from uml.config import Paths, parse_params
    from uml.data.prepare import prepare
    from uml.data.store import open_prepared
    from uml.models import build_model
    from uml.train import worker
    from uml.train.trainer import model_config

    # The counter of tests/train/test_worker.py, defined here again on purpose: --tree measures
    # older checkouts, which do not have it.
    class HostReads(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.tensors: list[torch.Tensor] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                self.tensors.append(args[0])  # kept alive, so data_ptr() identifies it afterwards
            return func(*args, **(kwargs or {}))

    # One worker in this process: Ray Train's model and loader preparation are the identity.
    ray.train.torch.prepare_model = lambda model: model
    ray.train.torch.prepare_data_loader = lambda loader: loader
    torch.set_num_threads(2)
    cpu = torch.device("cpu")

    with tempfile.TemporaryDirectory(prefix="uml-host-syncs-") as tmp:
        raw = yaml.safe_load((tree / "params.yaml").read_text())
        raw["data"].update(root=str(Path(tmp) / "data"), image_size=64)
        raw["data"]["synthetic"].update(num_images=24, render_size=64)
        raw["train"].update(batch_size=4, loader_workers=0)
        params = parse_params(raw, source="host_syncs")
        prepare(params)
        data = open_prepared(Paths(params).dataset)
        cfg = model_config(params, data.class_names, data.mask_classes, data.image_size).to_dict()
        worker_data = worker.open_worker_data(params, str(Paths(params).dataset), 0, 1, cpu)
        batches = list(itertools.islice(worker_data.loader, 3))

        def count(steps: int) -> tuple[int, int, int]:
            state = worker.build_state(params, cfg, 2, cpu)
            worker_data.loader = batches[:steps]  # train_one_epoch iterates it like the DataLoader
            with HostReads() as reads:
                worker.train_one_epoch(state, worker_data, params, 0, 0, cpu, None)
            counters = {s["step"].data_ptr() for s in state.optimizer.state.values()}
            adam = sum(t.data_ptr() in counters for t in reads.tensors)
            return adam, len(reads.tensors) - adam, len(state.optimizer.state)

        adam1, other1, tensors = count(1)
        adam3, other3, _ = count(3)
    per_step_adam, per_step_other = (adam3 - adam1) / 2, (other3 - other1) / 2
    per_epoch_other = other1 - per_step_other

    def adam_tensors(preset: str) -> int:
        net = build_model(preset, num_classes=len(data.class_names), num_mask_classes=len(data.mask_classes))
        return sum(p.requires_grad for p in net.parameters())

    print(f"uml from {tree}\n")
    print("| host reads | count |")
    print("|---|---:|")
    print(f"| Adam step counters per step (CPU tensors; {tensors} parameter tensors) | {per_step_adam:.0f} |")
    print(f"| other reads per step | {per_step_other:.0f} |")
    print(f"| other reads per epoch | {per_epoch_other:.0f} |")
    for preset in ("small", "paper"):
        print(f"\n{preset} preset: {adam_tensors(preset)} parameter tensors with gradients "
              "(Adam step reads per step; device syncs if the counters are on the GPU)")


if __name__ == "__main__":
    main()
