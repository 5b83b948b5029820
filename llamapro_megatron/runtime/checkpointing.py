"""Helpers for megatron-core dist_checkpointing (torch_dist) state dicts."""

from __future__ import annotations

import contextlib
import dataclasses
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

    with _in_process_results_queue():
        dist_checkpointing.save(sharded_state_dict, checkpoint_dir, **kwargs)


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
