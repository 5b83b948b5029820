"""Safetensors shards assembled from byte ranges of other safetensors files, without torch.

Block expansion writes source tensors unchanged or zeroed under new names. When no dtype changes, the bytes can
go from file to file inside the kernel (`os.sendfile`, as `shutil.copyfile` does) instead of through a tensor,
and a worker that does only this needs no torch import (seconds per process on a small machine). The file is
byte-for-byte what `safetensors.torch.save_file(tensors, path, metadata)` writes for the same single-dtype
tensors: an 8-byte little-endian header length, the compact JSON header (metadata first, then the tensors by
name), space-padded to a multiple of 8, then the data in header order.

No torch: the direct conversion paths and the spawned `expand-hf` workers use it.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from llamapro_megatron.checkpoint.hf import read_header

_CHUNK = 16 << 20


class Piece(NamedTuple):
    """`length` bytes of `path` from `offset`; zeros when path is None."""
    path: str | None
    offset: int
    length: int


@dataclass(frozen=True)
class TensorCopy:
    """One output tensor: `src_name` of `src_file` written as `name`, or zeros of its size when `zero`."""
    name: str
    src_file: str
    src_name: str
    zero: bool = False


def write_shard(path: str | Path, tensors: list[TensorCopy], metadata: dict[str, str] | None = None,
                headers: dict[str, tuple[int, dict]] | None = None) -> int:
    """Write `tensors` (all of one dtype) to a safetensors file at `path`; returns the data bytes written.

    `headers` caches `read_header` per source file across calls.
    """
    headers = {} if headers is None else headers
    entries = []
    for t in tensors:
        if t.src_file not in headers:
            headers[t.src_file] = read_header(t.src_file)
        start, header = headers[t.src_file]
        info = header[t.src_name]
        begin, end = info["data_offsets"]
        piece = Piece(None if t.zero else t.src_file, start + begin, end - begin)
        entries.append((t.name, info["dtype"], info["shape"], [piece]))
    return write_pieces(path, entries, metadata)


def write_pieces(path: str | Path, tensors: list[tuple[str, str, list[int], list[Piece]]],
                 metadata: dict[str, str] | None = None) -> int:
    """Write a safetensors file of (name, safetensors dtype, shape, pieces) tensors, all of one dtype, each the
    concatenation of its pieces. Returns the data bytes written."""
    entries = sorted(tensors, key=lambda t: t[0])
    dtypes = {dtype for _, dtype, _, _ in entries}
    if len(dtypes) > 1:
        raise ValueError(f"{path}: one dtype per shard (safetensors orders mixed dtypes differently), got {dtypes}")

    out_header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, dtype, shape, pieces in entries:
        size = sum(length for _, _, length in pieces)
        out_header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(out_header, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)

    # mode 0600, as safetensors' own writer leaves its files (it writes a temporary file and renames it)
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as out:
        out.write(len(raw).to_bytes(8, "little") + raw)
        out.flush()
        for _, _, _, pieces in entries:
            copy_pieces(out, pieces)
    return offset


def copy_pieces(out, pieces: list[Piece]) -> None:
    """Append the pieces' bytes to the open file `out`, in the kernel where it can."""
    for p in pieces:
        if p.path is None:
            write_zeros(out, p.length)
        else:
            with open(p.path, "rb") as src:
                copy_range(src, out, p.offset, p.length)


def copy_range(src, out, offset: int, size: int) -> None:
    if hasattr(os, "sendfile"):
        try:
            while size:
                sent = os.sendfile(out.fileno(), src.fileno(), offset, size)
                if sent == 0:
                    raise OSError(f"{src.name} ended before byte {offset + size}")
                offset, size = offset + sent, size - sent
            return
        except OSError as e:
            if getattr(e, "errno", None) not in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: no file-to-file sendfile
                raise
    src.seek(offset)
    while size:
        chunk = src.read(min(size, _CHUNK))
        if not chunk:
            raise OSError(f"{src.name} ended before byte {offset + size}")
        out.write(chunk)
        size -= len(chunk)
    out.flush()


def write_zeros(out, size: int) -> None:
    zeros = bytes(min(size, _CHUNK))
    while size:
        n = min(size, len(zeros))
        out.write(zeros[:n] if n < len(zeros) else zeros)
        size -= n
    out.flush()
