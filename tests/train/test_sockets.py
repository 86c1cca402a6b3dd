"""Listening sockets of training runs: the helpers that find them, and the collective libraries'
interface choice.

The end-to-end checks use these helpers on real runs: the crash-and-resume test
(tests/train/test_ray_training.py) inspects every process of a local train stage with its own Ray
instance while the run is held after an epoch, and tests/train/test_job_submit.py watches a job on
a loopback head. Every listener (Ray's services, the DDP rendezvous store and gloo) must be on
loopback."""

import ipaddress
from pathlib import Path

import psutil
import pytest

from uml.train.cluster import collective_socket_env

IFF_LOOPBACK = 0x8  # linux/if.h
# A Ray actor's process title is its class name, with the running method or task appended while it
# runs one ("ray::RayTrainWorker.<method>"; at the end of a run "ray::execute._shutdown_torch").
TRAIN_WORKER = "ray::RayTrainWorker"


def _is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback


def _process_tree(root: psutil.Process) -> list[psutil.Process]:
    """``root`` and its descendants now (none once ``root`` has ended)."""
    try:
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _listeners(root: psutil.Process) -> dict[tuple[str, int], tuple[int, str]]:
    """(ip, port) -> (pid, process name) of every listening socket of ``root`` and its descendants."""
    found = {}
    for process in _process_tree(root):
        try:
            connections = process.net_connections(kind="inet")
            name = process.name()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        for conn in connections:
            if conn.status == psutil.CONN_LISTEN:
                found[(conn.laddr.ip, conn.laddr.port)] = (process.pid, name)
    return found


def _process_titles(root: psutil.Process) -> dict[int, str]:
    """pid -> process name (a Ray worker's title) of ``root`` and each of its descendants now."""
    found = {}
    for process in _process_tree(root):
        try:
            found[process.pid] = process.name()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def _is_loopback_interface(name: str) -> bool:
    flags = Path(f"/sys/class/net/{name}/flags")
    return bool(name) and flags.is_file() and bool(int(flags.read_text(), 16) & IFF_LOOPBACK)


@pytest.mark.skipif(not Path("/sys/class/net").is_dir(), reason="needs Linux sysfs to tell loopback interfaces")
def test_collective_sockets_are_bound_to_the_interface_of_ray_host():
    for host in ("127.0.0.1", "localhost"):
        env = collective_socket_env(host)
        assert env["GLOO_SOCKET_IFNAME"] == env["NCCL_SOCKET_IFNAME"]
        assert _is_loopback_interface(env["GLOO_SOCKET_IFNAME"])
    assert collective_socket_env("0.0.0.0") == {}  # every interface, as asked
    assert collective_socket_env("192.0.2.1") == {}  # no local interface carries it: libraries decide
