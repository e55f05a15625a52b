"""Data-parallel training over Dask workers with ``torch.distributed``.

One rank per GPU worker (``dask worker --resources GPU=1``, or ``voxelmill --gpus N``): the
training task runs on each of them at once, the ranks meet through a TCP rendezvous on rank
0's worker and train one model with ``DistributedDataParallel`` — NCCL between CUDA devices,
gloo on CPUs.

The global batch is the configured ``train.batch_size``; rank ``r`` of ``N`` makes the
samples ``j`` with ``j % N == r`` (each still drawn from ``(seed, i, j)``), so N ranks see
exactly the crops one process would. The loss's batch-wide normalizers (valid-voxel counts,
Dice sums, class counts of ``pos_weight``/``class_weights: auto``) are summed over the ranks
by :func:`global_sum`, an all-reduce that autograd goes through: every rank computes the
loss of the global batch, and (as DDP averages the gradients of the N identical losses,
each the sum of its ranks' contributions) the update equals one process's on the whole
batch, within float tolerance.
"""

from __future__ import annotations

import datetime
import socket
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

#: how long a rank waits for the others (validation and checkpoints run on rank 0 alone)
TIMEOUT = datetime.timedelta(minutes=60)


@dataclass(frozen=True)
class Rank:
    """This process's place among the ranks of one training.

    Attributes
    ----------
    rank, world : int
        Index of this rank and number of ranks.
    init_method : str
        ``tcp://HOST:PORT`` of the rendezvous (on rank 0's worker).
    device_index : int
        The CUDA device among those this worker sees (several GPU workers of one job see
        all of the job's devices; with ``CUDA_VISIBLE_DEVICES`` set per worker it is 0).
    local_ranks : int
        Ranks on this rank's machine (they share its cores among their crop loaders).
    """

    rank: int
    world: int
    init_method: str
    device_index: int = 0
    local_ranks: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: writes checkpoints, metrics and progress."""
        return self.rank == 0

    def samples(self, batch_size: int) -> list[int]:
        """The sample indices of the global batch that this rank makes."""
        return list(range(self.rank, batch_size, self.world))


def free_port() -> int:
    """A TCP port free on this machine now (for the rendezvous; run on rank 0's worker)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def host_of(address: str) -> str:
    """The host of a Dask address ``tcp://HOST:PORT``."""
    hostport = address.split("://", 1)[-1]
    return hostport.rsplit(":", 1)[0].strip("[]")


def local_indices(addresses: list[str]) -> list[int]:
    """For each worker, its index among the workers of the same host (in order)."""
    seen: dict[str, int] = {}
    out = []
    for a in addresses:
        h = host_of(a)
        out.append(seen.get(h, 0))
        seen[h] = seen.get(h, 0) + 1
    return out


def start(rank: Rank, device: torch.device) -> None:
    """Join the process group (NCCL on CUDA, gloo otherwise)."""
    if dist.is_initialized():  # a previous training in this worker process ended badly
        dist.destroy_process_group()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=rank.init_method, rank=rank.rank,
                            world_size=rank.world, timeout=TIMEOUT)


def stop() -> None:
    """Leave the process group."""
    if dist.is_initialized():
        dist.destroy_process_group()


def global_sum(x: torch.Tensor) -> torch.Tensor:
    """The sum of ``x`` over the ranks, differentiable (its backward sums the ranks'
    gradients); ``x`` itself outside a process group."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(x, op=dist.ReduceOp.SUM)


def reducer() -> Callable[[torch.Tensor], torch.Tensor] | None:
    """:func:`global_sum` inside a process group of several ranks, else ``None`` (the
    losses' plain single-process path)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        return global_sum
    return None


def any_rank(flag: bool, device: torch.device) -> bool:
    """True when ``flag`` is true on any rank (every rank must call it)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def from_main(flag: bool, device: torch.device) -> bool:
    """Rank 0's ``flag`` on every rank (every rank must call it)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.broadcast(t, src=0)
    return bool(t.item() > 0)


def sync_batch_norm(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Batch norms computed over the global batch (CUDA ranks; call before making the
    optimizer: the layers are replaced). Unchanged outside a group of several ranks."""
    if not dist.is_initialized() or dist.get_world_size() == 1 or device.type != "cuda":
        return model
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` in ``DistributedDataParallel``, or as it is outside a process group of
    several ranks (the wrapper shares the model's parameters)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    if device.type == "cuda":
        return DistributedDataParallel(model, device_ids=[device.index])
    return DistributedDataParallel(model)


__all__ = ["Rank", "any_rank", "free_port", "from_main", "global_sum", "host_of",
           "local_indices", "reducer", "start", "stop", "sync_batch_norm", "wrap"]
