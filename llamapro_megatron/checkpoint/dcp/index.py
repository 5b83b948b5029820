"""Where each tensor chunk of a torch_dist checkpoint lies on disk, read without torch.

A torch_dist directory holds PyTorch DCP metadata (`.metadata`: a pickle of
`torch.distributed.checkpoint.metadata.Metadata`) and data files in which each chunk is a `torch.save` archive
(`archive`). Reading both needs no torch: the pickle is loaded with stand-in classes for DCP's plain
dataclasses (and strings for dtypes, layouts, memory formats), and each archive's central directory says where
its tensor bytes start. Anything else in the pickle (another class, a flattened tensor, a storage transform) is
refused with `Unreadable`, and callers use megatron-core's loader instead. Nothing in the pickle is ever called:
the unpickler's `find_class` hands out only stand-ins and plain containers.

Relies on (torch 2.4 - 2.13):
- the metadata pickle names only classes of `torch.distributed.checkpoint.{metadata,filesystem,planner}`, `torch.Size`,
  torch dtypes / layouts / memory formats (`TensorProperties.__getstate__` puts the dtype first), and builtins;
- the fields `state_dict_metadata`, `storage_data`, `TensorStorageMetadata.{properties,size,chunks}`,
  `ChunkStorageMetadata.{offsets,sizes}`, `MetadataIndex.{fqn,offset}`,
  `_StorageInfo.{relative_path,offset,length,transform_descriptors}`;
- a chunk's archive ends with a zip end record; `data.pkl` rebuilds one tensor with `torch._utils._rebuild_tensor_v2`
  from a persistent-id storage ('storage', <Type>Storage, key, 'cpu', numel), stored uncompressed as `data/<key>`.
"""
from __future__ import annotations

import math
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

from llamapro_megatron.checkpoint.dcp.archive import ITEMSIZE, STORAGE_TYPES
from llamapro_megatron.checkpoint.dcp.merge import DCP_METADATA

_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem",
                "torch.distributed.checkpoint.planner")
_TORCH_NAMES = {*ITEMSIZE, "strided", "contiguous_format", "preserve_format", "channels_last"}
_STORAGE_DTYPES = {v: k for k, v in STORAGE_TYPES.items()}


class Unreadable(ValueError):
    """The checkpoint uses something this reader does not know; use megatron-core's loader."""


@dataclass(frozen=True)
class ChunkLocation:
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str
    offset: int  # of the archive in the file
    length: int


@dataclass
class TensorIndex:
    dtype: str
    size: tuple[int, ...]
    chunks: list[ChunkLocation]


class _Stub:
    """A DCP dataclass or enum, as plain attributes."""

    def __init__(self, *args, **kwargs):
        self.args = args
        self.__dict__.update(kwargs)

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2 and all(s is None or isinstance(s, dict) for s in state):
            for part in state:
                self.__dict__.update(part or {})
        elif isinstance(state, dict):
            self.__dict__.update(state)
        else:  # a custom __getstate__'s value (TensorProperties: a tuple, dtype first)
            self.state = state


class _Unpickler(pickle.Unpickler):
    _stubs: dict[str, type] = {}

    def find_class(self, module: str, name: str):
        if module in _DCP_MODULES:
            return self._stubs.setdefault(name, type(name, (_Stub,), {}))
        if module == "torch" and name == "Size":
            return tuple
        if module == "torch" and name in _TORCH_NAMES:
            return name
        if module == "torch.serialization" and name == "_get_layout":
            return lambda text: text.removeprefix("torch.")
        if module == "builtins" and name in ("set", "frozenset", "dict", "list", "tuple"):
            return super().find_class(module, name)
        if module == "collections" and name == "OrderedDict":
            return super().find_class(module, name)
        raise Unreadable(f"{module}.{name} in the checkpoint's DCP metadata")


def extents_of(md) -> dict[str, int]:
    """Each data file a loaded DCP metadata (ours or PyTorch's own classes) names, and the end of its last chunk."""
    extents: dict[str, int] = {}
    for info in md.storage_data.values():
        extents[info.relative_path] = max(extents.get(info.relative_path, 0), info.offset + info.length)
    return extents


def storage_extents(ckpt_dir: str | Path) -> dict[str, int]:
    """:func:`extents_of` the checkpoint's `.metadata`, read with the stand-ins (no torch)."""
    path = Path(ckpt_dir) / DCP_METADATA
    try:
        with open(path, "rb") as f:
            extents = extents_of(_Unpickler(f).load())
    except (OSError, pickle.UnpicklingError, AttributeError, KeyError, TypeError, ValueError, EOFError,
            IndexError) as e:
        raise Unreadable(f"{path}: {e!r}") from e
    return extents


def read_tensor_index(ckpt_dir: str | Path) -> dict[str, TensorIndex]:
    """Every tensor of the checkpoint: dtype, global size and where each of its chunks' archives is."""
    path = Path(ckpt_dir) / DCP_METADATA
    try:
        with open(path, "rb") as f:
            md = _Unpickler(f).load()
        if getattr(md, "mcore_data", None):  # megatron-core's flattened tensors (distributed optimizer state)
            raise Unreadable("flattened tensors")
        storage = {}
        for index, info in md.storage_data.items():
            if getattr(info, "transform_descriptors", None):
                raise Unreadable(f"{index.fqn} is stored through a transform")
            storage[(index.fqn, tuple(getattr(index, "offset", None) or ()))] = info
        tensors = {}
        for key, entry in md.state_dict_metadata.items():
            if type(entry).__name__ != "TensorStorageMetadata":
                continue
            chunks = []
            for c in entry.chunks:
                info = storage[(key, tuple(c.offsets))]
                chunks.append(ChunkLocation(tuple(c.offsets), tuple(c.sizes), info.relative_path, info.offset,
                                            info.length))
            props = entry.properties
            dtype = props.dtype if hasattr(props, "dtype") else props.state[0]
            if dtype not in ITEMSIZE:
                raise Unreadable(f"{key} has dtype {dtype}")
            tensors[key] = TensorIndex(dtype, tuple(entry.size), chunks)
    except (OSError, pickle.UnpicklingError, AttributeError, KeyError, TypeError, EOFError) as e:
        raise Unreadable(f"{path}: {e!r}") from e
    return tensors


def tensor_data_offset(ckpt_dir: str | Path, chunk: ChunkLocation, dtype: str) -> int:
    """Absolute offset in the chunk's file of the chunk's first byte, checked against its archive's pickle
    (dtype, contiguous layout, size); `Unreadable` when it is not a plain contiguous tensor."""
    path = Path(ckpt_dir) / chunk.file
    with open(path, "rb") as f:
        f.seek(chunk.offset + chunk.length - 22)
        end = f.read(22)
        if len(end) != 22 or end[:4] != b"PK\x05\x06":
            raise Unreadable(f"{path}: no zip end record for a chunk at {chunk.offset}")
        cd_size, cd_offset = struct.unpack("<2I", end[12:20])
        f.seek(chunk.offset + cd_offset)
        cd = f.read(cd_size)
        records = {}
        at = 0
        while at + 46 <= len(cd) and cd[at:at + 4] == b"PK\x01\x02":
            method, = struct.unpack("<H", cd[at + 10:at + 12])
            size, = struct.unpack("<I", cd[at + 24:at + 28])
            name_len, extra_len, comment_len = struct.unpack("<3H", cd[at + 28:at + 34])
            local, = struct.unpack("<I", cd[at + 42:at + 46])
            name = cd[at + 46:at + 46 + name_len].decode()
            records[name.split("/", 1)[-1]] = (method, size, local)
            at += 46 + name_len + extra_len + comment_len

        start, size = _data_record(f, path, chunk, records, "data.pkl")
        f.seek(start)
        key, storage_dtype, numel, offset, shape, stride = _TensorUnpickler(f.read(size)).tensor()
        contiguous = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
        if (storage_dtype != dtype or tuple(shape) != chunk.sizes or tuple(stride) != contiguous
                or offset + math.prod(shape) > numel):
            raise Unreadable(f"{path}: chunk at {chunk.offset} is not a contiguous {dtype} {list(chunk.sizes)} "
                             "tensor")
        data, size = _data_record(f, path, chunk, records, f"data/{key}")
    if size != numel * ITEMSIZE[dtype]:
        raise Unreadable(f"{path}: chunk at {chunk.offset}: storage of {size} bytes for {numel} elements")
    return data + offset * ITEMSIZE[dtype]


def _data_record(f, path: Path, chunk: ChunkLocation, records: dict, record: str) -> tuple[int, int]:
    if record not in records or records[record][0] != 0:
        raise Unreadable(f"{path}: chunk at {chunk.offset} has no stored {record}")
    _, size, local = records[record]
    f.seek(chunk.offset + local)
    header = f.read(30)
    name_len, extra_len = struct.unpack("<2H", header[26:30])
    return chunk.offset + local + 30 + name_len + extra_len, size


class _TensorUnpickler(pickle.Unpickler):
    """torch.save's data.pkl of one tensor -> (storage key, dtype, numel, storage offset, shape, stride)."""

    def __init__(self, raw: bytes):
        import io

        super().__init__(io.BytesIO(raw))

    def find_class(self, module: str, name: str):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return lambda storage, offset, shape, stride, *rest: (*storage, offset, tuple(shape), tuple(stride))
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if (module, name) == ("collections", "OrderedDict"):
            return super().find_class(module, name)
        raise Unreadable(f"{module}.{name} in a tensor archive")

    def persistent_load(self, pid):
        kind, dtype, key, location, numel = pid
        if kind != "storage" or location != "cpu":
            raise Unreadable(f"storage {pid!r}")
        return (key, dtype, numel)

    def tensor(self) -> tuple:
        result = self.load()
        if not isinstance(result, tuple) or len(result) != 6:
            raise Unreadable("a tensor archive that is not one plain tensor")
        return result
