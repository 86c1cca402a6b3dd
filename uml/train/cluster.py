"""Connecting to Ray: a local instance on loopback, or the cluster that ``ray.address`` /
``RAY_ADDRESS`` names; and who may write to ``ray.storage_path``. (What the cluster must offer
before a run starts, shared storage included, is :mod:`uml.train.preflight`.)"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import ray

from uml.config import Params, Paths, is_loopback_host
from uml.errors import ClusterError

log = logging.getLogger(__name__)

def cluster_address(params: Params) -> str | None:
    """``ray.address`` from params, else ``RAY_ADDRESS`` (set inside ``ray job submit``), else None."""
    return params.ray.address or os.environ.get("RAY_ADDRESS") or None


@contextmanager
def ray_session(params: Params) -> Iterator[None]:
    """Use the running Ray connection, join the configured cluster, or start a local instance.

    A local instance binds to ``ray.host`` (loopback by default) with its dashboard off unless
    ``ray.include_dashboard``, and is shut down on exit. A joined cluster is left running.
    The driver's ``NCCL_*`` environment variables (:func:`nccl_env`) reach every Ray worker of
    the session through its runtime environment (the nodes of a cluster were started with
    environments of their own); on a local instance, ``ray.host`` still decides
    ``NCCL_SOCKET_IFNAME`` (:func:`collective_socket_env`), and Ray Train runs without a
    preemption watcher and polls its workers more often (:data:`LOCAL_TRAIN_ENV`).
    """
    if ray.is_initialized():
        yield
        return
    address = cluster_address(params)
    runtime_env: dict[str, Any] = {"env_vars": {"NO_ALBUMENTATIONS_UPDATE": "1"}}
    passed = nccl_env()
    if passed:
        log.info("passing %s to the Ray workers", ", ".join(sorted(passed)))
    if address:
        runtime_env["env_vars"].update(passed)
        log.info("joining Ray cluster at %s", address)
        try:
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        except ConnectionError as exc:
            raise ClusterError(f"cannot reach the Ray cluster at '{address}' (ray.address / RAY_ADDRESS): {exc}") from None
    else:
        host = params.ray.host
        log.info("starting a local Ray instance on %s (%d CPUs)", host, os.cpu_count() or 1)
        # ray.host decides the interface of a local run's sockets, over an NCCL_SOCKET_IFNAME of the driver.
        runtime_env["env_vars"].update({**passed, **collective_socket_env(host), **local_train_env()})
        runtime_env["worker_process_setup_hook"] = f"{__name__}.{pin_ray_address.__name__}"
        with _single_node_mode(loopback=is_loopback_host(host)):
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
        if is_loopback_host(host) and not is_loopback_host(node_ip):
            log.warning("Ray chose node address %s: its services may listen beyond loopback", node_ip)
    saved_address = os.environ.get(RAY_ADDRESS_ENV)
    if not address:
        pin_ray_address()
    try:
        yield
    finally:
        ray.shutdown()
        if not address:
            if saved_address is None:
                os.environ.pop(RAY_ADDRESS_ENV, None)
            else:
                os.environ[RAY_ADDRESS_ENV] = saved_address


RAY_ADDRESS_ENV = "RAY_ADDRESS"

# Ray Train settings for a local instance (read by each run's controller). One machine that the
# user runs cannot be preempted, so the preemption watcher, an extra actor process that every run
# starts and polls, has nothing to watch (on a cluster of spot nodes it does: there Ray's default
# stays). The controller notices that the training function has returned, and takes each epoch's
# report, at its health-check poll, every 2 s by default: 0.5 s saves most of those 2 s at the
# end of every run. A poll that is not answered in time is carried over, not counted as a failure
# (a worker is declared dead only after RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S, 600 s).
# Measured on the tiny test run (1 epoch, 2 workers, 2 cores): 22.5 -> 19.6 s per run.
LOCAL_TRAIN_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


def local_train_env() -> dict[str, str]:
    """:data:`LOCAL_TRAIN_ENV`, except where this process's environment sets a variable itself:
    the user's value wins (the runtime env would otherwise override it in every worker)."""
    return {key: os.environ.get(key, value) for key, value in LOCAL_TRAIN_ENV.items()}


def nccl_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The ``NCCL_*`` variables of ``environ`` (default: this process's environment), which
    :func:`ray_session` passes on to the workers: NCCL reads its settings (``NCCL_DEBUG``,
    ``NCCL_SOCKET_IFNAME``, ``NCCL_IB_HCA``, ...) from the environment of each training process."""
    environ = os.environ if environ is None else environ
    return {key: value for key, value in environ.items() if key.startswith("NCCL_")}


def pin_ray_address() -> None:
    """Point this process's address-less Ray lookups at the instance it is connected to.

    Some Ray components find "the" cluster with no address given (the state API, which Ray
    Train's placement-group cleaner actor calls), and with two local instances on one machine
    (two runs, or a run and a test) they fail with "Found multiple active Ray instances".
    ``RAY_ADDRESS`` is what that lookup reads first. A local instance runs this in its driver and,
    as the ``worker_process_setup_hook`` of its runtime env, in every worker process."""
    os.environ[RAY_ADDRESS_ENV] = ray.get_runtime_context().gcs_address


def collective_socket_env(host: str) -> dict[str, str]:
    """Environment that binds the training workers' gloo and NCCL sockets to ``host``'s interface.

    gloo otherwise binds the address the machine's host name resolves to (often a LAN address),
    and NCCL picks an interface of its own. A wildcard host (0.0.0.0, ::) or a host no local
    interface carries leaves the libraries' defaults. (The DDP rendezvous store is bound by
    :class:`uml.train.rendezvous.BoundTorchConfig`.)"""
    import psutil

    address = "127.0.0.1" if host == "localhost" else host
    for interface, addresses in psutil.net_if_addrs().items():
        if any(a.address.split("%")[0] == address for a in addresses):
            return {"GLOO_SOCKET_IFNAME": interface, "NCCL_SOCKET_IFNAME": interface}
    return {}


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


def check_storage_trust(params: Params, *restored: Path) -> None:
    """Refuse a local ``ray.storage_path`` that another user could write to.

    Restoring a sweep unpickles ``tuner.pkl``, the trainable and the searcher state from the
    storage folder (Ray's design), and unpickling runs whatever code the file names: anyone who
    can write there can run code as the user who runs the stage. So the storage folder must be
    owned by this user (or root) and not writable by group or others, and no folder above it may
    be writable by everyone without the sticky bit (anyone could swap the storage folder for
    theirs). When the storage folder lets others in (group or other execute bit), the
    ``restored`` paths (an experiment folder about to be restored) and everything in them must
    pass the same test. A folder that does not exist yet is created private (mode 700).

    Object storage (``s3://``, ...) is not checked: there its access policy decides who writes.
    """
    paths = Paths(params)
    if paths.ray_storage_uri:
        return
    storage = paths.ray_storage
    if not storage.exists():
        storage.mkdir(mode=0o700, parents=True)
    for ancestor in storage.parents:
        mode = ancestor.stat().st_mode
        if mode & stat.S_IWOTH and not mode & stat.S_ISVTX:
            raise _untrusted(storage, f"the folder above it, {ancestor}, is writable by everyone (without the "
                                      "sticky bit), so anyone can replace the storage folder",
                             f"chmod o-w {ancestor}")
    _check_private(storage, storage)
    if storage.stat().st_mode & (stat.S_IXGRP | stat.S_IXOTH):
        for path in restored:
            if path.exists():
                for item in [path, *path.rglob("*")] if path.is_dir() else [path]:
                    _check_private(item, storage)


def _check_private(path: Path, storage: Path) -> None:
    try:
        info = path.stat()  # a link is judged by what it points to
    except OSError:  # a dangling link: nothing to read through it
        return
    if info.st_uid not in (os.getuid(), 0):
        raise _untrusted(storage, f"{path} is owned by another user (uid {info.st_uid})",
                         f"use a storage folder of your own, or chown -R {os.getuid()} {path}")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        who = "everyone" if info.st_mode & stat.S_IWOTH else "its group"
        raise _untrusted(storage, f"{path} is writable by {who} (mode {stat.S_IMODE(info.st_mode):o})",
                         f"chmod -R go-w {path}")


def _untrusted(storage: Path, problem: str, fix: str) -> ClusterError:
    return ClusterError(
        f"ray.storage_path {storage} is not safe to use: {problem}. Resuming a run unpickles files from this "
        f"folder, which runs code, so only you may be able to write there. Fix: {fix}, or set ray.storage_path "
        "to a folder only you can write to."
    )
