"""Trainable-only training saves (``--save-trainable-only``): the frozen tensors stay in the base checkpoint.

Such a save holds the tensors that train (+ optimizer, scheduler, RNG, position) and names, in ``llamapro.json``
``trainable_only``, the full checkpoint its frozen tensors are read from:

    "trainable_only": {"base": "/abs/ckpt/pro/release", "fingerprint": "sha256:...", "keys": [stored keys]}

The trained tensors are stored one key per decoder layer (``decoder.layers.5.mlp.linear_fc1.weight``, as
``unstack_layer_keys`` names them): megatron-core stores homogeneous layers stacked along a layer axis, and a
save of some layers only would leave that axis with holes. Every reader of a checkpoint goes through
`load.load`, which reads each requested tensor from the save when it is there (:func:`split_state`) and from the
base otherwise, so a trainable-only save is accepted wherever a full one is.

The fingerprint is a SHA-256 over the base's torch_dist metadata (``.metadata``, which differs between saves) and
the size and first and last 64 KiB of each of its data files: cheap at any model size, and it refuses a base
that was rewritten, replaced or truncated. (It is not a hash of every byte.)
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
from pathlib import Path
from typing import Any

from llamapro_megatron.checkpoint.mcore import META_FILE, CheckpointMeta, read_meta, resolve_checkpoint
from llamapro_megatron.errors import UserError

SAMPLE_BYTES = 64 << 10


@functools.lru_cache(maxsize=16)
def _fingerprint_cached(path: str, stamp: tuple) -> str:
    root = Path(path)
    h = hashlib.sha256()
    h.update((root / ".metadata").read_bytes())
    for f in sorted(root.glob("*.distcp")):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(SAMPLE_BYTES))
            fh.seek(max(0, size - SAMPLE_BYTES))
            h.update(fh.read(SAMPLE_BYTES))
    return "sha256:" + h.hexdigest()


def fingerprint(ckpt_dir: str | Path) -> str:
    """Fingerprint of a torch_dist checkpoint directory (see the module docstring)."""
    root = Path(ckpt_dir).resolve()
    if not (root / ".metadata").is_file():
        raise UserError(f"{root} is not a torch_dist checkpoint (no .metadata)")
    stamp = tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(root.iterdir()) if f.is_file())
    return _fingerprint_cached(str(root), stamp)


def is_trainable_only(meta: CheckpointMeta) -> bool:
    return bool(getattr(meta, "trainable_only", None))


def resolve_base(ckpt_dir: str | Path, meta: CheckpointMeta, base: str | Path | None = None) -> Path:
    """The base checkpoint of a trainable-only save (recorded, or `base`), checked against the fingerprint."""
    info = meta.trainable_only
    path = Path(base if base is not None else info["base"])
    if path.is_dir() and not (path / META_FILE).is_file():  # a save directory: its latest checkpoint
        path = resolve_checkpoint(path, flag="--base")
    if not (path / META_FILE).is_file():
        raise UserError(f"{ckpt_dir} holds only the trainable tensors; its frozen tensors live in the base checkpoint "
                        f"{path}, which does not exist (any more). Restore it there, or give its new place with "
                        "`llamapro merge --base NEW_PLACE --trainable ...` to write a full checkpoint")
    if is_trainable_only(read_meta(path)):
        raise UserError(f"base {path} is itself a trainable-only save; the base must be a full checkpoint")
    found = fingerprint(path)
    if found != info["fingerprint"]:
        raise UserError(f"base checkpoint {path} does not match the one {ckpt_dir} was trained from (fingerprint "
                        f"{found[:19]}... recorded {info['fingerprint'][:19]}...): it was rewritten or replaced. "
                        "Use the original base checkpoint")
    return path.resolve()


# ----------------------------------------------------------- stored keys
def _unstack(entry: Any) -> Any:
    """A copy of a model sharded-state-dict entry whose decoder-layer tensors have per-layer keys."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    from llamapro_megatron.runtime.dist_ckpt import unstack_layer_keys

    if isinstance(entry, list):
        return [_unstack(e) for e in entry]
    if isinstance(entry, ShardedTensorFactory):
        entry = dataclasses.replace(entry)  # its build function gets wrapped: keep the caller's untouched
    return unstack_layer_keys({"x": entry})["x"]


def stored_keys(entry: Any) -> list[str]:
    """The per-layer checkpoint keys an entry (tensor, factory, list of tensors) reads or writes."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    if isinstance(entry, list):
        return [k for e in entry for k in stored_keys(e)]
    if isinstance(entry, ShardedTensorFactory):
        built = _unstack(entry).build()
        return sorted({t.key for t in _flatten(built)})
    if isinstance(entry, ShardedTensor):
        return [_unstack(entry).key]
    return []  # ShardedObject (TE extra state): always from the base


def _flatten(tree: Any) -> list:
    if isinstance(tree, dict):
        return [x for v in tree.values() for x in _flatten(v)]
    if isinstance(tree, list):
        return [x for v in tree for x in _flatten(v)]
    return [tree]


def trainable_entries(sharded: dict[str, Any], trainable_names: set[str]) -> dict[str, Any]:
    """The entries of a model sharded state dict that a trainable-only save writes, with per-layer keys."""
    return {name: _unstack(entry) for name, entry in sharded.items() if name in trainable_names}


# ------------------------------------------------------------------ split
def split_state(state: dict[str, Any], meta: CheckpointMeta, model_keys, ckpt_dir) -> tuple[dict, dict]:
    """A load request for a trainable-only save, split: (what the save stores, the model entries its base does).

    Under `model_keys`, an entry whose every stored key is in the save is read from it (with per-layer keys);
    one with none there, from the base; everything else in `state` from the save."""
    stored = set(meta.trainable_only["keys"])
    own = {k: v for k, v in state.items() if k not in model_keys}
    from_base: dict[str, Any] = {}
    for mk in model_keys:
        if mk not in state:
            continue
        own[mk], from_base[mk] = {}, {}
        for name, entry in state[mk].items():
            keys = stored_keys(entry)
            if keys and all(k in stored for k in keys):
                own[mk][name] = _unstack(entry)
            elif any(k in stored for k in keys):
                raise UserError(f"{ckpt_dir}: {name} is stored only in part ({keys}); the save is damaged")
            else:
                from_base[mk][name] = entry
    return own, from_base
