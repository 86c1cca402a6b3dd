"""The DDP process group of a Ray Train run, with its rendezvous store bound to one address.

Ray Train's ``TorchConfig`` sets ``MASTER_ADDR`` to rank 0's node address and lets
``init_process_group("env://")`` start torch's ``TCPStore`` server, which binds the wildcard
address (``::``, every interface) whatever ``MASTER_ADDR`` says. :class:`BoundTorchConfig` does
the same setup, except that rank 0 first binds a listening socket to its node address (loopback
for a local run) and hands it to the ``TCPStore`` (``master_listen_fd``); the other ranks connect
to that address as before. Ray's other steps (the ``RANK``/``WORLD_SIZE``/... variables of its
V2 workers) are kept by calling its own helper.

gloo's data sockets are bound by ``GLOO_SOCKET_IFNAME`` (and NCCL's by ``NCCL_SOCKET_IFNAME``),
which :func:`uml.train.cluster.ray_session` sets for a local instance.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import ray
import torch.distributed as dist
from ray.train._internal.worker_group import WorkerGroup as V1WorkerGroup
from ray.train.torch import TorchConfig
from ray.train.torch.config import _set_torch_distributed_env_vars, _TorchBackend

# Rank 0's listening socket, kept open for the life of its process group: the store serves
# every rank through it.
_listener: socket.socket | None = None


def _bind_rendezvous() -> tuple[str, int]:
    """On rank 0: listen on this node's Ray address (port chosen by the kernel); return it."""
    global _listener
    address = ray.util.get_node_ip_address()
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((address, 0))
    listener.listen()
    _listener = listener
    return address, listener.getsockname()[1]


def _join_process_group(backend: str, world_rank: int, world_size: int, address: str, port: int, timeout_s: int) -> None:
    """On every rank: connect to the store (rank 0 serves it on its bound socket) and init DDP."""
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = address, str(port)  # for libraries that read them
    timeout = timedelta(seconds=timeout_s)
    if world_rank == 0:
        assert _listener is not None, "rank 0 joins only after binding its rendezvous socket"
        store = dist.TCPStore(address, port, world_size, is_master=True, timeout=timeout, wait_for_workers=False,
                              master_listen_fd=_listener.fileno(), use_libuv=True)
    else:
        store = dist.TCPStore(address, port, world_size, is_master=False, timeout=timeout)
    dist.init_process_group(backend=backend, store=store, rank=world_rank, world_size=world_size, timeout=timeout)


class _BoundStoreBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config: "BoundTorchConfig") -> None:
        address, port = worker_group.execute_single(0, _bind_rendezvous)
        if not isinstance(worker_group, V1WorkerGroup):
            worker_group.execute(_set_torch_distributed_env_vars)
        ray.get([
            worker_group.execute_single_async(i, _join_process_group, backend=backend_config.backend, world_rank=i,
                                              world_size=len(worker_group), address=address, port=port,
                                              timeout_s=backend_config.timeout_s)
            for i in range(len(worker_group))
        ])


@dataclass
class BoundTorchConfig(TorchConfig):
    """``TorchConfig`` whose rendezvous store listens on rank 0's node address only.

    ``backend`` must be given (``"gloo"`` or ``"nccl"``)."""

    def __post_init__(self) -> None:
        if self.backend not in ("gloo", "nccl"):
            raise ValueError(f"BoundTorchConfig needs backend 'gloo' or 'nccl', got {self.backend!r}")

    @property
    def backend_cls(self):
        return _BoundStoreBackend
