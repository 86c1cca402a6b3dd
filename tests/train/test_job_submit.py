"""`ray job submit` of the train stage to a head node that this test starts on 127.0.0.1."""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import torch

from uml.config import Paths, load_params
from uml.data.prepare import prepare
from uml.models import load_model

from tests.train.test_sockets import TRAIN_WORKER, _is_loopback, _listeners, _process_titles
from tests.train.tiny import write_tiny_params

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))


def _cluster_processes(temp_dir: Path) -> set[int]:
    """The processes of the cluster whose Ray temp dir is ``temp_dir``: every Ray process names
    its temp or session dir on its command line. Other processes that started meanwhile (another
    test, another person's run) are not ours, whatever their start time."""
    pids = set()
    for proc in psutil.process_iter(["cmdline"]):
        if any(str(temp_dir) in arg for arg in (proc.info["cmdline"] or [])):
            pids.add(proc.pid)
    return pids


def _stop(pids: set[int]) -> None:
    """Stop exactly the cluster's processes (and whatever they spawned since): SIGTERM, then
    SIGKILL after a grace period, as `ray stop` does, but nothing else on the machine."""
    procs = set()
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            procs.add(proc)
            procs.update(proc.children(recursive=True))
        except psutil.Error:
            continue
    for proc in procs:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=8)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=10)


# What Ray's job API answers when the head's dashboard agent has not registered within the 10 s
# the head waits for it (it starts after `ray start` returns; on a loaded machine a submission can
# come first). Nothing ran: the submission is repeated, and only for this answer. An agent that
# never registers is a different fault: its HTTP port was taken. Every head a test starts therefore
# lets the agent pick a free port (--dashboard-agent-listen-port=0): the default, 52365, is also
# what any local ray.init() on another pytest worker takes, and CI failed on exactly that overlap.
AGENT_NOT_READY = "No available agent to submit job"
SUBMIT_TRIES = 10


@pytest.fixture
def head_node():
    """A one-node cluster listening on loopback only, with the ports it picks; stopped even on failure."""
    # A short path: Ray's unix sockets live under it and AF_UNIX paths are limited to ~107 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="umlray", dir="/tmp"))
    # Single-node mode is what makes Ray take 127.0.0.1 as the node address and bind to it.
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    started: set[int] = set()
    try:
        out = subprocess.run(
            [RAY, "start", "--head", "--node-ip-address=127.0.0.1", "--port=0", "--dashboard-host=127.0.0.1",
             "--dashboard-port=0", "--dashboard-agent-listen-port=0", "--num-cpus=2", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
            env=env, capture_output=True, text=True, timeout=180,
        )
        started = _cluster_processes(temp_dir)
        log = out.stdout + out.stderr
        assert out.returncode == 0, log[-3000:]
        address = re.search(r"http://127\.0\.0\.1:\d+", log)
        assert address, log[-3000:]
        yield address.group(0), started
    finally:
        _stop(started | _cluster_processes(temp_dir))
        shutil.rmtree(temp_dir, ignore_errors=True)


def _listening_addresses(pids: set[int]) -> set[str]:
    addresses = set()
    for pid in pids:
        try:
            for conn in psutil.Process(pid).net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    addresses.add(conn.laddr.ip)
        except psutil.Error:
            continue
    return addresses


def test_ray_job_submit_trains_on_a_loopback_head(head_node, tmp_path):
    address, started = head_node
    names = {psutil.Process(pid).name() for pid in started}
    assert {"gcs_server", "raylet"} <= names, names  # the selection by temp dir finds the head's services
    # Every service of the head listens on loopback only.
    assert _listening_addresses(started) <= {"127.0.0.1", "::ffff:127.0.0.1", "::1"}

    params_path = write_tiny_params(tmp_path, train={"epochs": 2, "use_tuned": False})
    params = load_params(params_path)
    prepare(params)
    # Current Ray enables token authentication; the CLI reads the head's token in this mode.
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    log_path = tmp_path / "job.log"
    # While the job runs, watch every process of the head (the raylet starts the job's driver and
    # the training workers as its descendants): the workers' own listeners (DDP rendezvous store,
    # gloo) must be on loopback too. tests/train/test_sockets.py does the same for a local run.
    heads = []
    for pid in started:
        try:
            heads.append(psutil.Process(pid))
        except psutil.Error:
            continue
    seen: dict[tuple[str, int], tuple[int, str]] = {}
    titles: dict[int, set[str]] = {}  # every title each process of the head was seen with
    deadline = time.time() + 600
    for _ in range(SUBMIT_TRIES):
        with log_path.open("w") as log_file:
            job = subprocess.Popen(
                [RAY, "job", "submit", "--address", address, "--working-dir", str(REPO), "--",
                 sys.executable, "-m", "pipeline.train", "--params", str(params_path)],
                env=env, stdout=log_file, stderr=subprocess.STDOUT,
            )
        try:
            while job.poll() is None and time.time() < deadline:
                for head in heads:
                    for address, (pid, title) in _listeners(head).items():
                        seen.setdefault(address, (pid, title))
                    for pid, title in _process_titles(head).items():
                        titles.setdefault(pid, set()).add(title)
                time.sleep(0.3)
        finally:
            if job.poll() is None:
                job.kill()
            job.wait()
        log = log_path.read_text()
        if job.returncode == 0 or AGENT_NOT_READY not in log:
            break
        time.sleep(1)
    assert job.returncode == 0, log[-4000:]
    assert "joining Ray cluster" in log and "succeeded" in log
    exposed = {addr: who for addr, who in seen.items() if not _is_loopback(addr[0])}
    assert not exposed, f"listening beyond loopback: {exposed}"
    # Told by the process, not by the title of one sighting: a worker's title changes with the task
    # it runs ("ray::RayTrainWorker.<method>", at the end "ray::execute._shutdown_torch"), and a
    # run once showed the workers' sockets only under the shutdown task's title.
    workers = {pid for pid, names in titles.items() if any(name.startswith(TRAIN_WORKER) for name in names)}
    worker_listeners = [addr for addr, (pid, _) in seen.items() if pid in workers]
    assert len(worker_listeners) >= 3, (seen, titles)  # rank 0's rendezvous store and gloo on both workers were seen

    paths = Paths(params)
    model = load_model(paths.model_pt)
    # The saved weights are the best epoch's of the run's own log (dvclive, written by the driver).
    rows = (paths.train_dir / "plots" / "metrics" / "val" / "score.tsv").read_text().splitlines()[1:]
    scores = [float(row.split("\t")[1]) for row in rows]
    assert len(scores) == 2  # train.epochs
    assert model.extra["best_epoch"] == scores.index(max(scores))
    assert model.extra["best_metrics"]["val/score"] == pytest.approx(max(scores))
    metrics = json.loads((paths.train_dir / "metrics.json").read_text())  # dvclive nests "val/score"
    assert metrics["step"] == 1 and metrics["val"]["score"] == pytest.approx(scores[-1])
    assert torch.load(paths.model_pt, weights_only=True)["format"] == "uml-model/2"
