"""Connecting to Ray: a local instance on loopback, or the cluster that ``ray.address`` /
``RAY_ADDRESS`` names, and the shared-storage check for multi-node clusters."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import ray

from uml.config import Params, Paths
from uml.errors import ClusterError

log = logging.getLogger(__name__)

# Mount types that every node of a cluster can see at the same path.
NETWORK_FILESYSTEMS = {
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "cephfs", "ceph", "glusterfs",
    "fuse.glusterfs", "fuse.sshfs", "fuse.s3fs", "fuse.gcsfuse", "fuse.juicefs", "fuse.cephfs", "wekafs",
    "fuse.weka", "9p", "virtiofs", "fuse.mountpoint-s3", "fuse.rclone", "alluxio", "fuse.alluxio",
}


def cluster_address(params: Params) -> str | None:
    """``ray.address`` from params, else ``RAY_ADDRESS`` (set inside ``ray job submit``), else None."""
    return params.ray.address or os.environ.get("RAY_ADDRESS") or None


@contextmanager
def ray_session(params: Params) -> Iterator[None]:
    """Use the running Ray connection, join the configured cluster, or start a local instance.

    A local instance binds to ``ray.host`` (loopback by default) with its dashboard off unless
    ``ray.include_dashboard``, and is shut down on exit. A joined cluster is left running.
    """
    if ray.is_initialized():
        yield
        return
    address = cluster_address(params)
    runtime_env = {"env_vars": {"NO_ALBUMENTATIONS_UPDATE": "1"}}
    if address:
        log.info("joining Ray cluster at %s", address)
        try:
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        except ConnectionError as exc:
            raise ClusterError(f"cannot reach the Ray cluster at '{address}' (ray.address / RAY_ADDRESS): {exc}") from None
    else:
        host = params.ray.host
        log.info("starting a local Ray instance on %s (%d CPUs)", host, os.cpu_count() or 1)
        with _single_node_mode(loopback=_is_loopback(host)):
            # address="local" never attaches to some other cluster that happens to run here.
            ray.init(
                address="local",
                num_cpus=os.cpu_count(),
                include_dashboard=params.ray.include_dashboard,
                dashboard_host=host,
                _node_ip_address=host,
                runtime_env=runtime_env,
                log_to_driver=True,
            )
        node_ip = ray.util.get_node_ip_address()
        if _is_loopback(host) and not _is_loopback(node_ip):
            log.warning("Ray chose node address %s: its services may listen beyond loopback", node_ip)
    try:
        yield
    finally:
        ray.shutdown()


def _is_loopback(host: str) -> bool:
    return host in ("127.0.0.1", "localhost", "::1")


# Ray binds its gRPC servers (GCS, raylet, workers) to the node address, and it only takes a
# loopback node address in its single-node mode: the variable below, read when ray is imported.
SINGLE_NODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextmanager
def _single_node_mode(loopback: bool) -> Iterator[None]:
    """Start a local instance whose services listen on loopback only.

    ``ray.init(_node_ip_address="127.0.0.1")`` alone is rewritten to the machine's address, so
    every Ray server would listen on all interfaces. The processes that ray.init spawns read the
    variable from the environment. This driver imported ray before we knew the params, so it
    gets the same value through the constant; both are restored once the instance is up.
    """
    if not loopback:
        yield
        return
    from ray._private import ray_constants

    saved_env, saved_flag = os.environ.get(SINGLE_NODE_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[SINGLE_NODE_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(SINGLE_NODE_ENV, None)
        else:
            os.environ[SINGLE_NODE_ENV] = saved_env


def _mount_type(path: Path) -> str | None:
    """Filesystem type of the mount that holds ``path`` (Linux ``/proc/mounts``)."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None
    best, best_type = "", None
    resolved = str(path.resolve())
    for line in mounts:
        parts = line.split()
        if len(parts) < 3:
            continue
        mount_point = parts[1].replace("\\040", " ")
        if (resolved == mount_point or resolved.startswith(mount_point.rstrip("/") + "/")) and len(mount_point) > len(best):
            best, best_type = mount_point, parts[2]
    return best_type


def check_storage(params: Params, num_nodes: int) -> None:
    """Refuse a node-local ``storage_path`` on a multi-node cluster: checkpoints written by one
    node would be invisible to the others, and resume or the final model would silently break."""
    paths = Paths(params)
    if num_nodes <= 1 or paths.ray_storage_uri or params.ray.shared_storage:
        return
    existing = paths.ray_storage
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    fs_type = _mount_type(existing)
    if fs_type in NETWORK_FILESYSTEMS:
        return
    raise ClusterError(
        f"the Ray cluster has {num_nodes} nodes but ray.storage_path resolves to '{paths.ray_storage}' "
        f"on a local filesystem ({fs_type or 'unknown type'}). Checkpoints must be on shared storage that every "
        "node sees: set ray.storage_path to an NFS path or an s3:// (gs://, ...) URI, and data.root to shared "
        "storage too; or set ray.shared_storage: true if this path is shared in a way the stage cannot detect."
    )


def alive_nodes() -> int:
    return sum(1 for node in ray.nodes() if node.get("Alive"))
