"""The one checkpoint reader: every command that reads a Megatron checkpoint (export, expand, merge, verify,
evaluate, generate, training start and resume) loads through :func:`load`.

A full checkpoint is read by megatron-core's `dist_checkpointing.load`. A trainable-only training save
(`trainable.py`) holds the trained tensors only: each requested model tensor is read from the save when it stores
it and from its base checkpoint otherwise, so such a save is accepted wherever a full one is.

Nothing a checkpoint contains runs while it loads (`runtime/safe_load.py`, installed in every process that imports
megatron-core); a refused file raises one `UnsafeCheckpoint` naming it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from llamapro_megatron.checkpoint import trainable
from llamapro_megatron.checkpoint.mcore import CheckpointMeta, read_meta


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

    if not trainable.is_trainable_only(meta):
        with refusals_surface(ckpt_dir):
            return dist_checkpointing.load(state, str(ckpt_dir), validate_access_integrity=strict)
    base_dir = trainable.resolve_base(ckpt_dir, meta, base)
    own, from_base = trainable.split_state(state, meta, model_keys, ckpt_dir)
    with refusals_surface(ckpt_dir):
        loaded = dist_checkpointing.load(own, str(ckpt_dir), validate_access_integrity=strict)
    with refusals_surface(base_dir):
        base_loaded = dist_checkpointing.load(from_base, str(base_dir), validate_access_integrity=False)
    for mk in from_base:
        loaded[mk] = {**base_loaded.get(mk, {}), **loaded.get(mk, {})}
    return loaded


def load_model_weights(model, ckpt_dir: str | Path) -> None:
    """Load this rank's part of a torch_dist checkpoint into a model built at any TP/PP (megatron-core reshards);
    a trainable-only save is completed from its base."""
    state = load({"model": model.sharded_state_dict()}, ckpt_dir, read_meta(ckpt_dir), strict=True)
    model.load_state_dict(state["model"])
