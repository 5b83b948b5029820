"""A checkpoint is data: loading a Megatron checkpoint never runs code that the checkpoint contains.

A torch_dist checkpoint holds pickles in two places PyTorch's DCP reader unpickles without restriction (torch 2.4 -
2.13): `.metadata`, with `pickle.load` (`filesystem.FileSystemReader.read_metadata`), and every non-tensor object
(RNG states, TE's extra state, megatron-core 0.19's common state), with `torch.load(weights_only=False)`
(`default_planner.DefaultLoadPlanner.load_bytes`, which megatron-core's load planner inherits). A planted
`__reduce__` in either runs on load. :func:`install` (from `runtime.prepare`, so in every process that imports
megatron-core) replaces both, once:

- `.metadata` is read by :class:`RestrictedUnpickler`: exactly the classes DCP writes there (listed below, read from
  the checkpoints of both tested megatron-core versions), torch dtypes and plain containers; anything else is refused.
- objects are read with `torch.load(weights_only=True)`, with the numpy types of a saved numpy RNG state allowed.

Tensor chunks are already read with `weights_only=True` by DCP, and `common.pt` by megatron-core's `torch.load`
(torch's default, `weights_only=True`). A refused file raises :class:`UnsafeCheckpoint`: one line naming the file (or
object) and the class it wanted; nothing from it has run.
"""
from __future__ import annotations

import contextlib
import io
import logging
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import UserError

# What DCP's `.metadata` names (module, class): its metadata dataclasses and enums, the storage info, torch.Size and
# the layout / memory-format helpers of TensorProperties.
_DCP_GLOBALS = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    *(("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "ChunkStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING")),
    *(("torch.distributed.checkpoint.planner", name) for name in (
        "SavePlan", "WriteItem", "WriteItemType", "TensorWriteData", "LoadPlan", "ReadItem", "LoadItemType")),
    *(("builtins", name) for name in ("set", "frozenset", "dict", "list", "tuple", "bytes", "bytearray")),
    ("collections", "OrderedDict"),
}


class UnsafeCheckpoint(UserError):
    """A checkpoint file wanted to load something that is not data (exit code 1: a refused input, not a bad flag)."""

    exit_code = 1

    def __init__(self, message: str):
        super().__init__(message)
        _refusals.append(self)  # PyTorch may catch and rewrap it (see refusals_surface)


_refusals: list[UnsafeCheckpoint] = []  # the refusals of the load in progress in this process


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata; `source` names the file in the refusal."""

    def __init__(self, file, source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _DCP_GLOBALS:
            return super().find_class(module, name)
        if module == "torch":
            import torch

            value = getattr(torch, name, None)
            if isinstance(value, torch.dtype):
                return value
        raise UnsafeCheckpoint(f"{self.source}: refused to load {module}.{name} (checkpoint metadata holds only "
                               "PyTorch DCP's metadata classes; this file could run code). Do not use this checkpoint")


class _RestrictedPickle:
    """Stands in for the `pickle` module inside DCP's file system reader, which calls `pickle.load` (`.metadata`) and
    `pickle.dump` (its writer) only: loads restricted, dumps as pickle does."""

    dump = staticmethod(pickle.dump)

    @staticmethod
    def load(file, **_: Any) -> Any:
        return RestrictedUnpickler(file, str(getattr(file, "name", "the checkpoint's .metadata"))).load()


def load_metadata(path) -> Any:
    """A DCP `.metadata` file, read restricted."""
    with open(path, "rb") as f:
        return RestrictedUnpickler(f, str(path)).load()


def _numpy_rng_globals() -> list:
    """The numpy types `np.random.get_state()` pickles to (the trainer saves it with the RNG states)."""
    import numpy as np

    reconstruct = getattr(getattr(np, "_core", None), "multiarray", None) or np.core.multiarray
    return [np.ndarray, np.dtype, reconstruct._reconstruct, type(np.dtype(np.uint32))]


def load_object(value: io.BytesIO, what: str) -> Any:
    """One saved object (`torch.save` bytes) loaded as weights only; `what` names it in a refusal."""
    import torch

    try:
        with torch.serialization.safe_globals(_numpy_rng_globals()):
            return torch.load(value, weights_only=True)
    except pickle.UnpicklingError as e:
        value.seek(0)
        wanted = ", ".join(torch.serialization.get_unsafe_globals_in_checkpoint(value)) or "a non-data object"
        raise UnsafeCheckpoint(f"{what}: refused to load {wanted} (a checkpoint object holds only tensors and plain "
                               "data; this one could run code). Do not use this checkpoint") from e


def _load_bytes(self, read_item, value: io.BytesIO) -> None:
    """`DefaultLoadPlanner.load_bytes` of torch 2.4 - 2.13, with the object loaded as weights only."""
    from torch.distributed.checkpoint._traverse import set_element  # what torch's own load_bytes uses

    fqn = read_item.dest_index.fqn
    obj = load_object(value, f"checkpoint object {fqn}")
    if self.flatten_state_dict:
        set_element(self.original_state_dict, self.mappings[fqn], obj)
    else:
        self.state_dict[fqn] = obj


_load_bytes._llamapro_safe = True  # type: ignore[attr-defined]


@contextlib.contextmanager
def refusals_surface(ckpt_dir) -> Iterator[None]:
    """Around a checkpoint load: a refusal comes out as one `UnsafeCheckpoint`, not as PyTorch's wrapping of it.

    DCP collects each rank's exception into a `CheckpointException` (a BaseException) whose text is every rank's
    traceback; a refusal inside it is raised as itself. `common.pt` is read by megatron-core with `torch.load`
    (weights only): its `UnpicklingError` becomes an `UnsafeCheckpoint` naming the file and what it wanted, when the
    file does want something that is not data."""
    from torch.distributed.checkpoint.api import CheckpointException

    _refusals.clear()
    try:
        yield
    except BaseException as e:
        if _refusals and not isinstance(e, UnsafeCheckpoint):  # e.g. DCP's "metadata is None" AssertionError
            raise _refusals[0] from None
        if isinstance(e, CheckpointException):
            _raise_wrapped(e, ckpt_dir)
        if isinstance(e, pickle.UnpicklingError):
            _raise_common_pt(ckpt_dir)
        raise


def _raise_wrapped(e, ckpt_dir) -> None:
    for exc, _ in e.failures.values():
        if isinstance(exc, UserError):
            raise exc from None
        if isinstance(exc, pickle.UnpicklingError):  # a tensor chunk that is not a plain tensor
            raise UnsafeCheckpoint(f"{ckpt_dir}: refused to load a tensor chunk that holds other objects "
                                   f"({_first_line(exc)}). Do not use this checkpoint") from None
        if isinstance(exc, EOFError) or (isinstance(exc, RuntimeError) and "PytorchStreamReader" in str(exc)):
            raise UserError(f"{ckpt_dir}: a stored chunk cannot be read ({_first_line(exc)}); the checkpoint is "
                            "damaged") from None


def _raise_common_pt(ckpt_dir) -> None:
    import torch

    common = Path(ckpt_dir) / "common.pt"
    wanted = torch.serialization.get_unsafe_globals_in_checkpoint(common) if common.is_file() else []
    if wanted:
        raise UnsafeCheckpoint(f"{common}: refused to load {', '.join(wanted)} (a checkpoint's common state holds "
                               "only plain data; this file could run code). Do not use this checkpoint") from None


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if "GLOBAL" in line] or str(exc).splitlines()[:1]
    return lines[0] if lines else type(exc).__name__


def load_index_cache(path, mmap_mode=None, **_: Any) -> Any:
    """A megatron-core dataset index cache (`.npy` under the data cache path: integer arrays), loaded without pickle.

    megatron-core loads them with `numpy.load(allow_pickle=True)` (0.16; 0.19 through its own restricted unpickler),
    so a planted object array in a shared cache directory would run on load. An array that needs pickle is refused."""
    import numpy
    from numpy.lib import format as npy

    with open(path, "rb") as f:
        version = npy.read_magic(f)
        header = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
        _, _, dtype = header(f)
    if dtype.hasobject:
        raise UnsafeCheckpoint(f"{path}: refused to load an object array (a dataset index cache holds only integer "
                               "arrays; this file could run code). Delete the file, or the --data-cache-path "
                               "directory, and megatron-core rebuilds it")
    return numpy.load(path, mmap_mode=mmap_mode, allow_pickle=False)


class _NumpyWithoutPickle:
    """Stands in for `numpy` inside megatron-core's dataset modules: `load` is :func:`load_index_cache`."""

    load = staticmethod(load_index_cache)

    def __getattr__(self, name: str) -> Any:  # only for names not looked up before: each is kept on the instance
        import numpy

        value = getattr(numpy, name)
        setattr(self, name, value)
        return value


def restrict_dataset_caches() -> None:
    """Route the index-cache loads of megatron-core's GPT and blended datasets through :func:`load_index_cache`
    (idempotent); called where the project builds those datasets (`data.blend.build_datasets`)."""
    from megatron.core.datasets import blended_dataset, gpt_dataset

    for module in (gpt_dataset, blended_dataset):
        if not isinstance(module.numpy, _NumpyWithoutPickle):
            module.numpy = _NumpyWithoutPickle()
        if hasattr(module, "safe_numpy_load"):  # 0.19's loader (restricted pickle): no pickle at all instead
            module.safe_numpy_load = load_index_cache


def install() -> None:
    """Route DCP's two unrestricted loads through the restricted ones (idempotent; see the module docstring)."""
    import torch.distributed.checkpoint.default_planner as planner
    import torch.distributed.checkpoint.filesystem as filesystem

    if getattr(filesystem, "pickle", None) is pickle:
        filesystem.pickle = _RestrictedPickle
    if not getattr(planner.DefaultLoadPlanner.load_bytes, "_llamapro_safe", False):
        planner.DefaultLoadPlanner.load_bytes = _load_bytes
    # DCP's loader logs a failed metadata read with its traceback ("Global metadata is not found", torch 2.13
    # `state_dict_loader.py`, on the root logger) before it falls back: not for a refusal, reported once as itself
    log = logging.getLogger()
    if not any(isinstance(f, _NoRefusalTracebacks) for f in log.filters):
        log.addFilter(_NoRefusalTracebacks())


class _NoRefusalTracebacks(logging.Filter):
    """Drops the tracebacks DCP logs for a refused metadata read, and for its fallback read of a per-rank metadata
    file that then does not exist (megatron-core 0.19's reader offers one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.exc_info:
            return True
        return not (isinstance(record.exc_info[1], UnsafeCheckpoint) or _refusals)
