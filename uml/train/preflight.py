"""Checks the train and tune drivers run on the Ray cluster before any training worker starts.

Each catches a configuration that Ray would otherwise turn into a late or silent failure, and
stops with a :class:`ClusterError` that says what to change:

* :func:`check_gpu_request`: two DDP ranks on one GPU (``resources_per_worker: {GPU: 0.5}`` with
  several workers) is accepted by Ray and rejected by NCCL ("Duplicate GPU detected"); a
  fractional GPU count above one is not a device count.
* :func:`check_resources_fit`: a worker that fits on no alive node, or more workers than the
  cluster holds, leaves Ray's placement group pending and the run waiting forever.
* :func:`check_shared_paths`: on several nodes, the prepared store at ``data.root`` (a shared
  folder, or the copy on object storage) and a local ``ray.storage_path`` must be the same files
  on every node. A task pinned to each alive node
  (``NodeAffinitySchedulingStrategy``) checks it there: the store's metadata file must be on that
  node with the driver's bytes, and a marker file the driver writes into the storage folder must
  be readable there, and the node's own marker visible back on the driver. A node-local path
  otherwise fails inside a remote worker with a misleading "run prepare" message, retried
  ``ray.max_failures`` times, or checkpoints silently land on one node's disk.

The resource check uses the nodes alive when the run starts: a cluster that an autoscaler would
grow is judged by what it has now.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import socket
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import ray
from ray.train import ScalingConfig
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from uml.config import Params, Paths
from uml.data.store import read_store_file
from uml.errors import ClusterError

# The store's group metadata: its attrs hold every file's checksum and the content hash, so equal
# bytes mean the same store.
STORE_METADATA = "zarr.json"
MARKER_DIR = ".uml-preflight"
PROBE_TIMEOUT_S = 120.0


def scaling_config(params: Params, num_workers: int | None = None) -> ScalingConfig:
    """The ``ScalingConfig`` of a training run: ``ray.resources_per_worker``, plus one GPU per
    worker when ``ray.use_gpu`` names none."""
    resources = dict(params.ray.resources_per_worker)
    if params.ray.use_gpu:
        resources.setdefault("GPU", 1)
    return ScalingConfig(num_workers=num_workers or params.ray.num_workers, use_gpu=params.ray.use_gpu,
                         resources_per_worker=resources)


def bundle(scaling: ScalingConfig) -> dict[str, float]:
    """What Ray reserves for one worker (its placement-group bundle), from Ray's own accessors."""
    request = {"CPU": scaling.num_cpus_per_worker, "GPU": scaling.num_gpus_per_worker,
               **scaling.additional_resources_per_worker}
    return {name: float(amount) for name, amount in request.items() if amount}


def check_gpu_request(use_gpu: bool, gpus_per_worker: float, num_workers: int) -> None:
    """Refuse GPU shares NCCL cannot run: a fraction of a GPU per rank with more than one rank
    (two ranks of one process group may land on one device), or a non-integer count above one."""
    if not use_gpu or not gpus_per_worker:
        return
    if gpus_per_worker < 1 and num_workers > 1:
        raise ClusterError(
            f"ray.resources_per_worker GPU is {gpus_per_worker:g} with {num_workers} workers: Ray may place two "
            "ranks on one GPU, and NCCL refuses that ('Duplicate GPU detected'). Give each worker a whole GPU "
            "(GPU: 1), or run one worker.")
    if gpus_per_worker > 1 and gpus_per_worker != int(gpus_per_worker):
        raise ClusterError(
            f"ray.resources_per_worker GPU is {gpus_per_worker:g}: above one GPU per worker the count must be "
            "a whole number (each rank uses its first visible GPU; the fraction would be reserved for nothing).")


def check_resources_fit(request: Mapping[str, float], num_workers: int, nodes: Sequence[Mapping[str, Any]]) -> None:
    """Refuse a request the cluster can never place: one worker's resources (``request``) must fit
    on some alive node (``nodes`` as :func:`ray.nodes` lists them), and ``num_workers`` of them on
    all alive nodes together (each node holds whole workers)."""
    alive = [node for node in nodes if node.get("Alive")]
    per_node = [_workers_on(request, node.get("Resources", {})) for node in alive]
    wanted = ", ".join(f"{name}: {amount:g}" for name, amount in sorted(request.items()))
    if not any(per_node):
        largest = {name: max((node.get("Resources", {}).get(name, 0.0) for node in alive), default=0.0)
                   for name in request}
        raise ClusterError(
            f"one training worker asks for {{{wanted}}} (ray.resources_per_worker, ray.use_gpu) but no alive node "
            f"of the {len(alive)} has that much: the largest node offers "
            f"{{{', '.join(f'{n}: {a:g}' for n, a in sorted(largest.items()))}}}. Ray would wait for such a node "
            "forever. Lower ray.resources_per_worker or add a node that has it.")
    if sum(per_node) < num_workers:
        raise ClusterError(
            f"{num_workers} training workers of {{{wanted}}} each do not fit on the cluster: its {len(alive)} alive "
            f"node(s) hold {sum(per_node)} (per node: {per_node}). Ray would wait for room forever. Lower "
            "ray.num_workers (tune.workers_per_trial in a sweep) or ray.resources_per_worker, or add nodes.")


def _workers_on(request: Mapping[str, float], resources: Mapping[str, float]) -> int:
    """How many bundles of ``request`` a node with ``resources`` holds."""
    return min((math.floor(resources.get(name, 0.0) / amount + 1e-9) for name, amount in request.items()),
               default=0)


# ------------------------------------------------------------------------- shared paths
def _probe_node(store: str, store_digest: str, marker: str | None, marker_text: str | None,
                node_name: str) -> list[str]:
    """On one node: what it cannot see of the driver's store and storage folder (empty: all)."""
    problems = []
    try:
        content = read_store_file(store, STORE_METADATA)
    except OSError as exc:
        problems.append(f"the prepared store {store} (data.root) cannot be read there: {exc}")
    else:
        if content is None:
            problems.append(f"the prepared store {store} (data.root) does not exist there")
        elif hashlib.sha256(content).hexdigest() != store_digest:
            problems.append(f"the prepared store {store} (data.root) there is a different copy than the driver's")
    if marker is not None:
        path = Path(marker)
        try:
            seen = path.read_text()
        except OSError:
            seen = None
        if seen != marker_text:
            problems.append(f"a file the driver wrote into ray.storage_path ({path.parent.parent}) is not visible there")
        else:
            try:
                path.with_name(f"{path.name}.{node_name}").write_text(node_name)
            except OSError as exc:
                problems.append(f"ray.storage_path ({path.parent.parent}) is not writable there: {exc}")
    return problems


ProbeFn = Callable[[str, str, str | None, str | None, str], list[str]]


def check_shared_paths(params: Params, nodes: Sequence[Mapping[str, Any]], probe: ProbeFn = _probe_node) -> None:
    """On a cluster of more than one alive node, run ``probe`` on every alive node and refuse a
    store or storage folder that any node does not share (see the module docstring).

    ``probe`` is the check each node runs; tests pass a wrapper that changes one node's view of
    the filesystem, since two nodes on one machine see the same files."""
    alive = [node for node in nodes if node.get("Alive")]
    paths = Paths(params)
    if len(alive) <= 1:
        return
    metadata = paths.dataset / STORE_METADATA
    if not metadata.is_file():
        return  # the driver's open_prepared has already said so, with the fix
    # With data.root on object storage the nodes read the copy there, which holds the same bytes.
    store, store_digest = paths.shared_dataset, hashlib.sha256(metadata.read_bytes()).hexdigest()
    marker = marker_text = None
    marker_dir = None
    if not paths.ray_storage_uri:  # object storage is the same bucket from every node
        marker_dir = paths.ray_storage / MARKER_DIR
        marker_text = f"{socket.gethostname()} {uuid.uuid4().hex}"
        marker = str(marker_dir / uuid.uuid4().hex)
        try:
            marker_dir.mkdir(parents=True, exist_ok=True)
            Path(marker).write_text(marker_text)
        except OSError as exc:
            raise ClusterError(f"cannot write into ray.storage_path {paths.ray_storage}: {exc}") from None
    failures = []
    try:
        remote = ray.remote(num_cpus=0, max_retries=0)(probe)
        pending = [
            remote.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False),
                name=f"uml-preflight:{node.get('NodeManagerAddress')}",
            ).remote(store, store_digest, marker, marker_text, node["NodeID"])
            for node in alive
        ]
        # One deadline for all nodes: a node that never runs the task (gone, or its raylet
        # stuck) is named instead of waited on.
        done, _ = ray.wait(pending, num_returns=len(pending), timeout=PROBE_TIMEOUT_S)
        for node, ref in zip(alive, pending):
            if ref not in done:
                problems = [f"the check did not run there within {PROBE_TIMEOUT_S:g} s"]
            else:
                try:
                    problems = ray.get(ref)
                except ray.exceptions.RayError as exc:
                    problems = [f"the check failed there: {exc}"]
            if marker is not None and not problems and not Path(f"{marker}.{node['NodeID']}").is_file():
                problems = [f"a file that node wrote into ray.storage_path ({paths.ray_storage}) is not visible to the driver"]
            failures += [f"node {node.get('NodeManagerAddress')} ({node['NodeID'][:12]}): {p}" for p in problems]
    finally:
        if marker_dir is not None:
            for item in marker_dir.glob(f"{Path(marker).name}*"):
                item.unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # another run's markers may still be there
                marker_dir.rmdir()
    if failures:
        raise ClusterError(
            f"the Ray cluster has {len(alive)} nodes, and data.root / ray.storage_path must be the same files on "
            "every one of them:\n  " + "\n  ".join(failures) + "\nPut data.root and ray.storage_path on storage every "
            "node mounts at the same path (NFS, a parallel filesystem), or set ray.storage_path to object storage "
            "(s3://, gs://).")


def preflight(params: Params, num_workers: int) -> None:
    """Every check above, against the cluster Ray is connected to (before any worker starts)."""
    scaling = scaling_config(params, num_workers)
    check_gpu_request(params.ray.use_gpu, scaling.num_gpus_per_worker, num_workers)
    nodes = ray.nodes()
    check_resources_fit(bundle(scaling), num_workers, nodes)
    check_shared_paths(params, nodes)
