"""megatron-core dist_checkpointing (torch_dist) and PyTorch DCP, where the project must bend their behaviour.

Every patch of their internals that checkpoints need lives here: a synchronous save without a multiprocessing
Manager, per-layer keys for partly trainable models, the save planner relaxed for round saves, and the optimizer's
common state made rank-independent.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import queue
import re
from typing import Any


def save(sharded_state_dict: dict, checkpoint_dir: str, **kwargs: Any) -> None:
    """`megatron.core.dist_checkpointing.save`, synchronous, without its multiprocessing Manager.

    Why: megatron-core's torch_dist writer (`strategies/filesystem_async.py`, `_get_write_results_queue`) hands
    write results back through `mp.get_context("spawn").Manager().Queue()`, built on a process's first save so
    that an *async* save's background process can reach it. A synchronous save runs the whole write from the
    calling process (`AsyncRequest.execute_sync`; the forked writers report on their own fork queue), so an
    in-process queue carries the same results, and no fresh interpreter is spawned: measured 4.6 s of a 10 s
    single-worker conversion on a 2-core machine, paid once by every process that saves.
    """
    from megatron.core import dist_checkpointing

    _no_async_deprecation_for_sync_saves()
    with _in_process_results_queue(), _writer_threads_not_forks():
        dist_checkpointing.save(sharded_state_dict, checkpoint_dir, **kwargs)
    _write_common_pt(checkpoint_dir)


COMMON_PT = "common.pt"


def _write_common_pt(checkpoint_dir: str) -> None:
    """Also store the checkpoint's common (non-sharded) state as `common.pt`, where megatron-core no longer writes it.

    Why: megatron-core 0.19 moved the common state into the DCP files (a `common_state` ShardedObject) and stopped
    writing `common.pt`; 0.16 reads only `common.pt` (`strategies/common.py`, `load_common`), and 0.19 still prefers
    a `common.pt` when there is one (`serialization.load_common_state_dict`). Written from what the installed
    megatron-core itself reads back, so a checkpoint saved under either version loads under the other. Rank 0 only,
    before the caller's barrier (every caller commits a save only after one)."""
    import torch
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    path = f"{checkpoint_dir}/{COMMON_PT}"
    if dist.get_rank() != 0 or os.path.exists(path):
        return
    torch.save(dist_checkpointing.load_common_state_dict(checkpoint_dir), path)


def _no_async_deprecation_for_sync_saves() -> None:
    """megatron-core 0.19's synchronous torch_dist save runs through its async writer and logs, once per process,
    "MCore's async save is deprecated ... use NVRx" (`strategies/torch.py`, `TorchDistSaveShardedStrategy.save`):
    advice for async saves, which the project never makes. Mark it as logged."""
    try:
        from megatron.core.dist_checkpointing.strategies import torch as torch_strategy
    except ImportError:
        return
    if hasattr(torch_strategy, "_logged_mcore_async_deprecation"):
        torch_strategy._logged_mcore_async_deprecation = True


@contextlib.contextmanager
def _in_process_results_queue():
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async as fa
    except ImportError:  # another megatron-core layout: its own queue is used
        yield
        return
    if not hasattr(fa, "_results_queue") or fa._results_queue is not None:
        yield  # a queue already exists (e.g. made by an async save): leave it alone
        return
    fa._results_queue = queue.Queue()
    try:
        yield
    finally:
        fa._results_queue = None


@contextlib.contextmanager
def _writer_threads_not_forks():
    """megatron-core 0.16's torch_dist writer forks a process per file it writes (`write_preloaded_data_multiproc`)
    and waits for each to report, with no timeout. Forking a process that runs threads (gloo's, the rendezvous
    store's, ours) can leave the child stuck on a lock another thread held at the fork; the save then never ends.
    megatron-core 0.19 writes the same files from threads (`write_preloaded_data_multithread`); with 0.16 the same
    per-file writer runs in threads here (:func:`_write_files_in_threads`)."""
    try:
        from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync as writer
    except ImportError:
        yield
        return
    original = writer.__dict__.get("write_preloaded_data_multiproc")
    if original is None or "write_preloaded_data_multithread" in writer.__dict__:
        yield  # 0.19: threads already
        return
    writer.write_preloaded_data_multiproc = staticmethod(_write_files_in_threads)
    try:
        yield
    finally:
        writer.write_preloaded_data_multiproc = original


def _write_files_in_threads(transform_list: list, use_msc: bool, rank: int, write_buckets: list,
                            global_results_queue: Any) -> None:
    """`write_preloaded_data_multiproc` of megatron-core 0.16 (same arguments, same result on the results queue: a
    dict of each file's write results, or the first exception), with one thread per file instead of a fork."""
    import threading

    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync as writer

    results: queue.Queue = queue.Queue()
    done: queue.Queue = queue.Queue()  # write_preloaded_data takes an item off and marks it done when finished
    extra = {"use_msc": True} if use_msc else {}
    threads = []
    for i, bucket in enumerate(write_buckets):
        done.put(i)
        threads.append(threading.Thread(target=writer.write_preloaded_data, name=f"ckpt-writer-{i}",
                                        args=(transform_list, i, bucket, results, done, True), kwargs=extra))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out: dict | Exception = {}
    while not results.empty():
        i, local = results.get()
        if isinstance(local, Exception):
            out = local
            break
        out[i] = local
    if not isinstance(out, Exception) and len(out) != len(write_buckets):
        out = RuntimeError(f"checkpoint writers reported {len(out)} of {len(write_buckets)} files")
    global_results_queue.put(out)


# "decoder.layers." not followed by a layer number: the stacked form of homogeneous decoder layers.
_STACKED_LAYERS = re.compile(r"decoder\.layers\.(?!\d+\.)")


def unstack_layer_keys(sharded_state_dict: Any) -> Any:
    """Give each decoder layer its own checkpoint key in a (typically optimizer) sharded state dict; in place.

    Why: megatron-core stores homogeneous decoder layers *stacked*: one key ``...decoder.layers.<param>`` whose
    global shape has a leading axis over all (global) layers (``TransformerBlock.sharded_state_dict``, the
    ``prepend_axis_num`` of each ShardedTensor). When only some layers train (LLaMA Pro: the expanded blocks),
    only those have optimizer state, so the stacked optimizer tensors have holes along the layer axis and
    dist_checkpointing's validation rejects the save ("invalid fill"). Here each such ShardedTensor becomes
    ``...decoder.layers.<global layer index>.<param>`` with the layer axis dropped, including the tensors that
    ShardedTensorFactories (e.g. SwiGLU's split ``linear_fc1``) build later.

    Use the same transformation when saving and when loading (keys must match). The model's own state dict
    needs no change (all layers are present). Returns the argument, for chaining.
    """
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace

    return dict_list_map_inplace(_unstack_one, sharded_state_dict)


def _unstack_one(item: Any) -> Any:
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    if isinstance(item, ShardedTensor):
        if item.prepend_axis_num < 1 or not _STACKED_LAYERS.search(item.key):
            return item
        layer = item.global_offset[0]
        frags = item.axis_fragmentations
        return dataclasses.replace(
            item,
            key=_STACKED_LAYERS.sub(f"decoder.layers.{layer}.", item.key, count=1),
            global_shape=tuple(item.global_shape[1:]),
            global_offset=tuple(item.global_offset[1:]),
            axis_fragmentations=None if frags is None else tuple(frags[1:]),
            prepend_axis_num=item.prepend_axis_num - 1,
            # a load/save buffer of another dtype may stand in for the parameter (checkpoints keep their dtype)
            dtype=item.data.dtype if item.data is not None else item.dtype,
        )
    if isinstance(item, ShardedTensorFactory) and not getattr(item.build_fn, "_llamapro_unstacked", False):
        build_fn = item.build_fn

        def build_unstacked(*args: Any, **kwargs: Any) -> Any:
            return dict_list_map_inplace(_unstack_one, build_fn(*args, **kwargs))

        build_unstacked._llamapro_unstacked = True  # type: ignore[attr-defined]
        item.build_fn = build_unstacked
    return item


@contextlib.contextmanager
def partial_saves_allowed():
    """PyTorch's save planner rejects a save whose chunks do not fill each tensor ("invalid fill"); a round save
    (`checkpoint/save.py`) fills only part of the stacked layer tensors. Drop that one error while a round saves
    (the overlap and bounds checks stay); the merge (`checkpoint/dcp/merge.py`) checks that the merged chunks fill
    every tensor. Patches `torch.distributed.checkpoint.default_planner._validate_global_plan`."""
    import torch.distributed.checkpoint.default_planner as planner

    original = getattr(planner, "_validate_global_plan", None)
    if original is None:  # another torch: nothing to relax (a failing round save would say so)
        yield
        return

    # the planner logs each error as a warning: captured here, not shown (the fill errors are expected)
    log = logging.getLogger(planner.__name__)
    saved = log.level, log.propagate

    def validate(global_plan, metadata):
        capture = _Capture()
        log.addHandler(capture)
        try:
            result = original(global_plan, metadata)
        finally:
            log.removeHandler(capture)
        if isinstance(result, bool):  # torch 2.11 (seen) and older: True when valid, the reasons only logged
            return result or bool(capture.messages) and all("invalid fill" in m for m in capture.messages)
        return [e for e in result if "invalid fill" not in e]  # newer torch: the list of errors

    planner._validate_global_plan = validate
    log.setLevel(logging.WARNING)
    log.propagate = False
    try:
        yield
    finally:
        planner._validate_global_plan = original
        log.setLevel(saved[0])
        log.propagate = saved[1]


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


# ------------------------------------------------- optimizer common state
# dist_checkpointing writes the non-tensor ("common") part of a state dict from global rank 0 only and merges it
# into every rank's loaded tensors. megatron-core's non-distributed optimizer leaves rank-dependent things there
# when rank 0 holds no trainable parameter (a frozen first pipeline stage): empty per-group lists of fp32 main
# params (then "Cannot merge two lists with different lengths" on load) and no Adam step (then torch Adam lacks
# `step` after the load). Both are made rank-independent here.
_MAIN_PARAMS = "fp32_from_fp16_params"


def rank_independent_optimizer_state(optim_sd: dict, is_loading: bool) -> dict:
    """The optimizer's sharded state dict with its common part the same on every rank (collective when saving);
    undo with :func:`optimizer_state_for_loading` after the load."""
    import torch
    import torch.distributed as dist

    if isinstance(optim_sd.get(_MAIN_PARAMS), list):  # [[param, ...] per group] -> {group: {index: param}}
        optim_sd[_MAIN_PARAMS] = {g: dict(enumerate(group)) for g, group in enumerate(optim_sd[_MAIN_PARAMS])}
    inner = optim_sd.get("optimizer", optim_sd)
    state = inner.get("state") if isinstance(inner, dict) else None
    if not is_loading and isinstance(state, dict) and "param_groups" in inner:
        mine = state.get("common_step")
        from llamapro_megatron.runtime.distributed import collective_device

        step = torch.tensor([0.0 if mine is None else float(mine)], dtype=torch.float64, device=collective_device())
        dist.all_reduce(step, op=dist.ReduceOp.MAX)
        if mine is None and step.item() > 0:
            state["common_step"] = torch.tensor(step.item(), dtype=torch.float32)  # torch Adam's step dtype
    return optim_sd


def optimizer_state_for_loading(optim_sd: dict) -> dict:
    """The loaded optimizer state dict in the form megatron-core's `load_state_dict` expects."""
    main = optim_sd.get(_MAIN_PARAMS)
    if isinstance(main, dict):
        optim_sd[_MAIN_PARAMS] = [[main[g][i] for i in sorted(main[g])] for g in sorted(main)]
    return optim_sd
