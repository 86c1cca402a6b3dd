"""Every listening socket of a local training run is on loopback: Ray's services, the DDP
rendezvous store and gloo. A real ``python -m pipeline.train`` with its own local Ray instance
is watched from outside, through every process it starts."""

import ipaddress
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from uml.config import load_params
from uml.data.prepare import prepare
from uml.train.cluster import collective_socket_env

from tests.train.tiny import write_tiny_params

REPO = Path(__file__).resolve().parents[2]
IFF_LOOPBACK = 0x8  # linux/if.h
# A Ray actor's process title is its class name, with the running method or task appended while it
# runs one ("ray::RayTrainWorker.<method>"; at the end of a run "ray::execute._shutdown_torch").
TRAIN_WORKER = "ray::RayTrainWorker"


def _is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback


def _listeners(root: psutil.Process) -> dict[tuple[str, int], tuple[int, str]]:
    """(ip, port) -> (pid, process name) of every listening socket of ``root`` and its descendants."""
    found = {}
    try:
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return found
    for process in processes:
        try:
            connections = process.net_connections(kind="inet")
            name = process.name()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        for conn in connections:
            if conn.status == psutil.CONN_LISTEN:
                found[(conn.laddr.ip, conn.laddr.port)] = (process.pid, name)
    return found


def _train_worker_environments(root: psutil.Process) -> list[dict[str, str]]:
    envs = []
    try:
        for process in root.children(recursive=True):
            try:
                if process.name().startswith(TRAIN_WORKER):
                    envs.append(process.environ())
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
    except psutil.NoSuchProcess:
        pass
    return envs


@pytest.mark.slow
def test_a_local_train_run_listens_on_loopback_only(tmp_path):
    params_path = write_tiny_params(tmp_path, train={"epochs": 2})
    prepare(load_params(params_path))
    env = {**os.environ, "RAY_ADDRESS": "", "NO_ALBUMENTATIONS_UPDATE": "1"}  # its own local Ray, as a user's run
    log_path = tmp_path / "train.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.train", "--params", str(params_path)], cwd=REPO,
                                env=env, stdout=log, stderr=subprocess.STDOUT)
    driver = psutil.Process(proc.pid)
    seen: dict[tuple[str, int], tuple[int, str]] = {}
    titles: dict[int, set[str]] = {}  # every title each listening process was seen with
    worker_envs: list[dict[str, str]] = []
    deadline = time.time() + 480
    try:
        while proc.poll() is None and time.time() < deadline:
            for address, (pid, title) in _listeners(driver).items():
                seen.setdefault(address, (pid, title))
                titles.setdefault(pid, set()).add(title)
            worker_envs = worker_envs or _train_worker_environments(driver)
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    output = log_path.read_text()
    assert proc.returncode == 0, output[-3000:]
    exposed = {addr: who for addr, who in seen.items() if not _is_loopback(addr[0])}
    assert not exposed, f"listening beyond loopback: {exposed}"
    # The run was watched while it trained: the workers' own listeners (the rendezvous store on
    # rank 0, gloo on both) were seen, besides Ray's services.
    # Told by the process, not by the title of one sighting: a worker's title changes with the task
    # it runs, and CI once saw the workers' sockets only under the shutdown task's title.
    workers = {pid for pid, names in titles.items() if any(name.startswith(TRAIN_WORKER) for name in names)}
    worker_listeners = [addr for addr, (pid, _) in seen.items() if pid in workers]
    assert len(worker_listeners) >= 3, seen
    assert {"gcs_server", "raylet"} <= {name for _, name in seen.values()}, seen
    # gloo binds what the host name resolves to unless told: the workers are told the loopback interface.
    assert worker_envs and all(_is_loopback_interface(e.get("GLOO_SOCKET_IFNAME", "")) for e in worker_envs)


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
