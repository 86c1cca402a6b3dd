"""Driver-side checks against the two-node test cluster of tests/train/test_cluster.py.

Run as a script in a process of its own: it connects with the cluster's token (the pytest
process never joins the cluster, so Ray's per-process token cache there stays untouched), prints
one JSON line and exits.

    python tests/train/cluster_checks.py ADDRESS paths PARAMS...    # the shared-path preflight
    python tests/train/cluster_checks.py ADDRESS stages PARAMS...   # train and tune drivers' preflight
    python tests/train/cluster_checks.py ADDRESS workers [TEXT]     # nodes of the Ray Train workers so far
                                                                    # (of the drivers whose command line has TEXT)
    python tests/train/cluster_checks.py - beside PARAMS            # a local instance while the cluster runs
    python tests/train/cluster_checks.py ADDRESS settings PARAMS    # what each training worker sees
"""

from __future__ import annotations

import json
import os
import sys
import time

import ray

from uml.config import load_params
from uml.errors import ClusterError
from uml.train.preflight import _probe_node, check_shared_paths
from uml.train.sweep import sweep
from uml.train.trainer import train

# Set on one node's `ray start`: a folder that node does not mount.
LACKS_ENV = "UML_TEST_NODE_LACKS"
HIDDEN = "/nonexistent-mount"


def probe_without_the_mount(store: str, digest: str, marker: str | None, marker_text: str | None, node: str) -> list[str]:
    """The real per-node check, on a node that lacks the folder named by ``UML_TEST_NODE_LACKS``.

    Both test nodes run on one machine and see the same files, so "node-local" is simulated: on
    the node whose environment names the folder, paths under it are looked up under a prefix
    that exists nowhere, as on a machine without that mount. Everything else is the product's
    check (:func:`uml.train.preflight._probe_node`), run on that node by the product's scheduling.
    Defined in ``__main__``, so Ray ships it to the nodes by value."""
    lacks = os.environ.get(LACKS_ENV)

    def view(path: str | None) -> str | None:
        if lacks and path and (path == lacks or path.startswith(lacks + "/")):
            return HIDDEN + path
        return path

    # Reported under the names the driver gave, as on a machine without the mount.
    return [problem.replace(HIDDEN, "") for problem in _probe_node(view(store), digest, view(marker), marker_text, node)]


def nodes_seen_by_the_state_api() -> list[str]:
    """The node addresses Ray's state API finds with no address given, as Ray Train's own
    components call it (e.g. its placement-group cleaner actor)."""
    from ray.util.state import list_nodes

    return sorted(node.node_ip for node in list_nodes())


def beside(params_file: str) -> dict:
    """A stage's local Ray instance started while another Ray instance runs on the machine: the
    state API, in the driver and in a worker process, must find this instance."""
    from uml.train.cluster import ray_session

    params = load_params(params_file)
    results: dict = {}
    with ray_session(params):
        for where, call in (("driver", nodes_seen_by_the_state_api),
                            ("worker", lambda: ray.get(ray.remote(num_cpus=0)(nodes_seen_by_the_state_api).remote()))):
            try:
                results[where] = call()
            except Exception as exc:  # the failure being tested: report it, not crash
                results[where] = f"{type(exc).__name__}: {exc}"
    return results


def record_settings(config: dict) -> None:
    """A training loop that only sets up the worker as the real one does
    (:func:`uml.train.worker.configure_worker`, inside Ray Train's process group) and writes what
    it sees beside the data: its NCCL_* environment, cudnn.benchmark, the process group's
    timeout. Defined in ``__main__``, so Ray ships it to the nodes by value."""
    import torch
    import torch.distributed as dist

    from uml.config import parse_params
    from uml.train.worker import configure_worker

    params = parse_params(config["params"], source="train config")
    rank, world, device = configure_worker(params)
    group = dist.group.WORLD._get_backend(torch.device("cpu"))
    seen = {"node": ray.util.get_node_ip_address(), "device": device.type, "world": world,
            "nccl": {key: value for key, value in os.environ.items() if key.startswith("NCCL_")},
            "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
            "timeout_s": group.options._timeout.total_seconds()}
    with open(os.path.join(params.data.root, f"settings-rank{rank}.json"), "w") as out:
        json.dump(seen, out)


def worker_settings(address: str, params_file: str) -> dict:
    """One Ray Train run of :func:`record_settings` on the cluster, joined as the stages join it
    (:func:`uml.train.cluster.ray_session`); returns what each rank saw."""
    from types import SimpleNamespace

    from uml.train.cluster import ray_session
    from uml.train.trainer import run_trainer

    params = load_params(params_file).with_overrides({"ray.address": address})
    with ray_session(params):
        run_trainer(params, name="settings", model_cfg=SimpleNamespace(to_dict=dict), epochs=1, train_loop=record_settings)
    return {f"rank{rank}": json.loads(open(os.path.join(params.data.root, f"settings-rank{rank}.json")).read())
            for rank in range(params.ray.num_workers)}


def main(address: str, mode: str, files: list[str]) -> dict:
    if mode == "beside":
        return beside(files[0])
    if mode == "settings":
        return worker_settings(address, files[0])
    ray.init(address=address, log_to_driver=False)
    deadline = time.time() + 60
    while sum(node["Alive"] for node in ray.nodes()) < 2 and time.time() < deadline:
        time.sleep(0.5)
    results: dict = {"nodes": sorted(node["NodeManagerAddress"] for node in ray.nodes() if node["Alive"])}
    for path in files:
        if mode == "paths":
            try:
                check_shared_paths(load_params(path).resolved(), ray.nodes(), probe=probe_without_the_mount)
                results[path] = "ok"
            except ClusterError as exc:
                results[path] = str(exc)
        elif mode == "stages":
            for stage in (train, sweep):
                start = time.perf_counter()
                try:
                    stage(load_params(path))
                    results[f"{path}:{stage.__name__}"] = "ran"
                except ClusterError as exc:
                    results[f"{path}:{stage.__name__}"] = {"error": str(exc), "seconds": time.perf_counter() - start}
    if mode == "workers":
        from ray.util.state import list_actors, list_jobs

        actors = list_actors(address=address, filters=[("class_name", "=", "RayTrainWorker")], detail=True, limit=1000)
        if files:  # only the workers of the drivers whose command line contains files[0]
            jobs = {job.job_id for job in list_jobs(address=address, limit=1000) if files[0] in (job.entrypoint or "")}
            actors = [actor for actor in actors if actor.job_id in jobs]
        node_ips = {node["NodeID"]: node["NodeManagerAddress"] for node in ray.nodes()}
        results["workers"] = [node_ips.get(actor.node_id) for actor in actors]
    return results


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2], sys.argv[3:])))
