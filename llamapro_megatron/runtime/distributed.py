"""Process group + megatron-core model-parallel state: set up and tear down (so a process can change layout)."""

from __future__ import annotations

import datetime
import math
import os
import random
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..arch import layout_world_size
from ..errors import UserError

DEFAULT_TIMEOUT_S = 600.0

_owns_process_group = False
_generation = 0  # process groups created so far; each gets a fresh key prefix in the shared store
_cached_store: tuple[tuple, dist.Store, int] | None = None
_groups_before: set | None = None  # process groups that existed before megatron-core created its own


@dataclass(frozen=True)
class ParallelInfo:
    """This process's place in the (tp, pp, dp) layout set up by :func:`init_distributed`; ``ep`` experts' ranks
    (MoE layers split their experts over ``ep`` of the data-parallel ranks), ``etp`` the tensor-parallel size of
    each expert (None: ``tp``)."""

    rank: int
    world_size: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    tp: int
    pp: int
    dp: int
    vpp: int | None
    device: torch.device
    ep: int = 1
    etp: int | None = None

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} is not an integer") from None


def _validate_layout(world_size: int, tp: int, pp: int, vpp: int | None, ep: int = 1, etp: int | None = None) -> None:
    for name, value in (("tp", tp), ("pp", pp), ("ep", ep), ("etp", tp if etp is None else etp)):
        if not isinstance(value, int) or value < 1:
            raise UserError(f"{name} must be a positive integer, got {value!r}")
    if world_size % (tp * pp):
        raise UserError(
            f"the world size {world_size} is not divisible by tp*pp = {tp}*{pp} = {tp * pp}; "
            f"launch a multiple of {tp * pp} processes or choose tp and pp whose product divides {world_size}"
        )
    if etp is None and (world_size // (tp * pp)) % ep:
        raise UserError(f"ep {ep} does not divide the {world_size // (tp * pp)} data-parallel ranks (world size "
                        f"{world_size} / tp*pp {tp * pp}): the experts are split over data-parallel ranks; launch "
                        f"a multiple of {tp * pp * ep} processes")
    if etp is not None and world_size % (etp * ep * pp):
        raise UserError(f"the world size {world_size} is not divisible by etp*ep*pp = {etp}*{ep}*{pp}: the experts "
                        f"are laid out over the same ranks; launch a multiple of {layout_world_size(tp, pp, ep, etp)} "
                        "processes")
    if vpp is not None and (not isinstance(vpp, int) or vpp < 1 or pp < 2):
        raise UserError(f"vpp (virtual pipeline stages per rank) needs pp >= 2 and an integer >= 1, got pp={pp} "
                        f"vpp={vpp!r}; use vpp=None without pipeline parallelism")


def _store(world_size: int, timeout: datetime.timedelta) -> tuple[dist.Store, int]:
    """The rendezvous store and this process's rank, created once per process and reused by every re-init.

    Under a launcher the store listens on MASTER_PORT (or is torchrun's agent store): a port can be bound once,
    so re-initialising at another layout must not open a new store there.
    """
    global _cached_store
    if _env_int("WORLD_SIZE") is None:
        return dist.HashStore(), 0  # a 1-process world needs no network rendezvous
    env_key = tuple(os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE"))
    if _cached_store is None or _cached_store[0] != env_key:
        if _env_int("RANK") is None:
            raise UserError("WORLD_SIZE is set but RANK is not; launch with torchrun or set both")
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if not os.environ.get(name):
                raise UserError(f"WORLD_SIZE is set but {name} is not; launch with torchrun or set it")
        store, rank, _ = next(dist.rendezvous("env://", timeout=timeout))
        _cached_store = (env_key, store, rank)
    return _cached_store[1], _cached_store[2]


def init_distributed(
    tp: int = 1, pp: int = 1, vpp: int | None = None, seed: int = 1234, timeout_s: float = DEFAULT_TIMEOUT_S,
    ep: int = 1, etp: int | None = None,
) -> ParallelInfo:
    """Initialise torch.distributed (if needed) and megatron-core's model-parallel groups and RNG.

    Inside a launcher (torchrun, :func:`~llamapro_megatron.runtime.launch.run_workers`) RANK/WORLD_SIZE/LOCAL_RANK/
    MASTER_ADDR/MASTER_PORT come from the environment; otherwise this process is a world of 1. Re-initialising after
    :func:`destroy_distributed` (e.g. at another tp/pp) reuses the rendezvous store under a fresh key prefix.
    Backend: nccl with the CUDA device LOCAL_RANK when CUDA is available, else gloo with
    :func:`~llamapro_megatron.runtime.cpu.enable_cpu_support`. A process group created by the caller beforehand
    is reused (and left alone by :func:`destroy_distributed`).

    Seeds: megatron's tracker via ``model_parallel_cuda_manual_seed(seed)`` (tensor-parallel ranks get distinct
    streams), and python/numpy/torch with ``seed + 100 * pp_rank`` as megatron's own trainer does (so pipeline
    stages do not draw identical numbers).
    """
    from . import prepare

    prepare()
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    global _owns_process_group, _generation
    if ps.model_parallel_is_initialized():
        raise UserError("megatron model parallel state is already initialised; call destroy_distributed() first")

    if dist.is_initialized():
        world_size = dist.get_world_size()
    else:
        world_size = _env_int("WORLD_SIZE") or 1
    _validate_layout(world_size, tp, pp, vpp, ep, etp)

    use_cuda = torch.cuda.is_available()
    local_rank = _env_int("LOCAL_RANK") or 0
    if use_cuda:
        visible = torch.cuda.device_count()
        if local_rank >= visible:
            raise UserError(f"LOCAL_RANK {local_rank} has no GPU: {visible} CUDA device(s) visible on this node. "
                            "Launch at most one process per GPU (--nproc-per-node), or hide the GPUs "
                            "(CUDA_VISIBLE_DEVICES=) to run on CPU")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")

    if not dist.is_initialized():
        store, rank = _store(world_size, datetime.timedelta(seconds=timeout_s))
        _generation += 1
        dist.init_process_group(
            "nccl" if use_cuda else "gloo",
            store=dist.PrefixStore(f"llamapro_megatron/{_generation}", store),
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        _owns_process_group = True

    global _groups_before
    _groups_before = set(_process_groups())
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
        distributed_timeout_minutes=max(1, math.ceil(timeout_s / 60)),
    )
    info = ParallelInfo(
        rank=dist.get_rank(),
        world_size=world_size,
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        tp=tp,
        pp=pp,
        dp=ps.get_data_parallel_world_size(),
        vpp=vpp,
        device=device,
        ep=ep,
        etp=etp,
    )
    stage_seed = seed + 100 * info.pp_rank
    random.seed(stage_seed)
    try:
        import numpy as np

        np.random.seed(stage_seed)
    except ImportError:  # numpy is a dependency of megatron-core; be lenient anyway
        pass
    torch.manual_seed(stage_seed)
    model_parallel_cuda_manual_seed(seed)
    return info


def collective_device() -> torch.device:
    """Where a tensor must live to take part in this process group's collectives: NCCL reduces CUDA tensors only."""
    backend = dist.get_backend() if dist.is_initialized() else ""
    if "nccl" in backend and "gloo" not in backend:  # "cpu:gloo,cuda:nccl" groups take CPU tensors too
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def destroy_distributed() -> None:
    """Undo :func:`init_distributed`: megatron's parallel state, then the process group if we created it."""
    global _owns_process_group, _groups_before
    if "megatron.core" in sys.modules:  # nothing to undo if megatron was never imported
        from megatron.core import parallel_state as ps

        ps.destroy_model_parallel()
    if _owns_process_group and dist.is_initialized():
        dist.destroy_process_group()
    elif _groups_before is not None and dist.is_initialized() and dist.get_backend() == "gloo":
        # megatron-core's destroy_model_parallel forgets its groups but never destroys them: in a process group the
        # caller keeps (a test's world, re-initialised at layout after layout), each gloo group's 3 threads stayed
        # (~100 groups per layout, thousands of threads after a few dozen) and starved collectives. NCCL groups
        # are left alone: their teardown can be collective, in an order this cannot know.
        for group in reversed(_process_groups()):
            if group not in _groups_before and group is not dist.GroupMember.WORLD:
                dist.destroy_process_group(group)
    _owns_process_group = False
    _groups_before = None


def _process_groups() -> list:
    """Every process group torch.distributed holds, in creation order (torch keeps them in a private map; empty if
    that ever moves, and then nothing is destroyed)."""
    world = getattr(dist.distributed_c10d, "_world", None)
    return list(getattr(world, "pg_map", None) or {})
