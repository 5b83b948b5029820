"""The one checkpoint reader: every command that reads a Megatron checkpoint (export, expand, merge, verify,
evaluate, generate, training start and resume) loads through :func:`load`.

A full checkpoint is read by megatron-core's `dist_checkpointing.load`. A trainable-only training save
(`trainable.py`) holds the trained tensors only: each requested model tensor is read from the save when it stores
it and from its base checkpoint otherwise, so such a save is accepted wherever a full one is.

Nothing a checkpoint contains runs while it loads (`runtime/safe_load.py`, installed in every process that imports
megatron-core); a refused file raises one `UnsafeCheckpoint` naming it.
"""
from __future__ import annotations

import functools
import os
import pickle
from pathlib import Path
from typing import Any

from llamapro_megatron.checkpoint import trainable
from llamapro_megatron.checkpoint.dcp.merge import DCP_METADATA
from llamapro_megatron.checkpoint.mcore import CheckpointMeta, read_meta
from llamapro_megatron.errors import UserError

MCORE_METADATA = "metadata.json"  # megatron-core's own marker of a dist checkpoint


def check_files(ckpt_dir: str | Path) -> None:
    """Every file the checkpoint's metadata lists is there, as large as the chunks it lists in it (cheap: one read of
    `.metadata`, restricted, and a stat per data file). A missing or truncated file is named in one UserError,
    instead of a reader's failure deep inside PyTorch's DCP on some rank."""
    d = Path(ckpt_dir)
    for name in (MCORE_METADATA, DCP_METADATA):
        if not (d / name).is_file():
            raise UserError(f"{d} has no {name}: not a complete torch_dist checkpoint (an interrupted save, or files "
                            "lost in a copy)")
    stat = (d / DCP_METADATA).stat()
    _check_files(str(d), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=16)
def _check_files(d: str, mtime_ns: int, size: int) -> None:  # once per checkpoint and process (rounds load often)
    from llamapro_megatron.checkpoint.dcp import index as dcp_index

    try:
        extents = dcp_index.storage_extents(d)  # without torch (the direct export's parent has none)
    except dcp_index.Unreadable:  # damaged, or a class the stand-ins do not know: the restricted reader decides
        extents = _extents_restricted(d)
    for name, needed in sorted(extents.items()):
        path = os.path.join(d, name)
        try:
            have = os.stat(path).st_size
        except FileNotFoundError:
            raise UserError(f"{path} is missing; the checkpoint's metadata lists data in it (files lost in a copy, "
                            "or an interrupted save)") from None
        if have < needed:
            raise UserError(f"{path} is truncated: {have} bytes, the checkpoint's metadata lists data up to byte "
                            f"{needed} (an interrupted copy or save)")


def _extents_restricted(d: str) -> dict[str, int]:
    from llamapro_megatron.checkpoint.dcp.index import extents_of
    from llamapro_megatron.runtime.safe_load import load_metadata

    path = os.path.join(d, DCP_METADATA)
    try:
        extents = extents_of(load_metadata(path))
    except UserError:  # a refusal (UnsafeCheckpoint), as it is
        raise
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError, IndexError, KeyError) as e:
        raise UserError(f"{path} cannot be read ({type(e).__name__}: {e}); the checkpoint is damaged") from None
    return extents


def load(state: dict[str, Any], ckpt_dir: str | Path, meta: CheckpointMeta, model_keys=("model",),
         strict: bool = False, base: str | Path | None = None) -> dict[str, Any]:
    """``dist_checkpointing.load`` of `state` from a full or a trainable-only checkpoint (collective).

    The entries under `model_keys` are read from a trainable-only save when it stores them and from its base
    otherwise (`base`: where the base is, when not where the save's metadata says); everything else in `state`
    (optimizer, RNG) from the save. `strict`: megatron-core's access-integrity check of the save's part (the base
    part is partial by design).
    """
    from megatron.core import dist_checkpointing

    from llamapro_megatron.runtime.safe_load import refusals_surface

    check_files(ckpt_dir)
    if not trainable.is_trainable_only(meta):
        with refusals_surface(ckpt_dir):
            return dist_checkpointing.load(state, str(ckpt_dir), validate_access_integrity=strict)
    import torch.distributed as dist

    base_dir = trainable.resolve_base(ckpt_dir, meta, base)
    own, from_base = trainable.split_state(state, meta, model_keys, ckpt_dir)
    if dist.get_world_size() == 1:
        # The base part leaves the trained layers out of each stacked tensor, and megatron-core's torch_dist reader
        # places what a request leaves out on "another rank", (rank + 1) % world (strategies/torch.py,
        # sharded_tensor_to_torch_sharded_tensor): this very rank in a world of one, whose read then fails. So a
        # world of one reads every requested tensor from the base, and the save's over it (same tensors, in place).
        from_base = {mk: dict(state[mk]) for mk in from_base}
    check_files(base_dir)
    with refusals_surface(base_dir):
        base_loaded = dist_checkpointing.load(from_base, str(base_dir), validate_access_integrity=False)
    with refusals_surface(ckpt_dir):
        loaded = dist_checkpointing.load(own, str(ckpt_dir), validate_access_integrity=strict)
    for mk in from_base:
        loaded[mk] = {**base_loaded.get(mk, {}), **loaded.get(mk, {})}
    return loaded


def load_model_weights(model, ckpt_dir: str | Path) -> None:
    """Load this rank's part of a torch_dist checkpoint into a model built at any TP/PP (megatron-core reshards);
    a trainable-only save is completed from its base."""
    state = load({"model": model.sharded_state_dict()}, ckpt_dir, read_meta(ckpt_dir), strict=True)
    model.load_state_dict(state["model"])
