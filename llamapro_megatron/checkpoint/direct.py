"""hf-to-mcore with the tensor data copied file to file while one process imports megatron-core.

Why: a worker's start (interpreter, torch, megatron-core) costs ~2-3 s on a 2-core machine, about what copying a
1.2B model's bytes costs, and the regular path (`convert.py`: workers build tensors and megatron-core's
dist_checkpointing writes them) can only start moving bytes after it. Here the work is split by what needs torch:

- The parent, which never imports torch, plans every tensor chunk of the checkpoint from the HF headers (keys,
  global shapes, chunk offsets: the layout megatron-core's `sharded_state_dict` gives a model built at TP=1 PP=1)
  and threads copy each chunk's bytes from the safetensors files into `.distcp` data files, framed as the
  `torch.save` archives PyTorch's DCP reader expects (`torch_archive`), in the kernel (`os.sendfile`).
- Meanwhile one spawned worker imports torch and megatron-core, builds the model on the meta device, checks that
  its sharded state dict is exactly the planned chunks (any difference: `LayoutMismatch`, and the conversion
  reruns on the regular path), lets megatron-core's own `dist_checkpointing.save` write everything that is not a
  tensor chunk (extra-state objects, `common.pt`, `metadata.json`) and adds the planned chunks to PyTorch's DCP
  metadata (`.metadata`), as `rounds.merge_rounds` merges rounds.

Used when no dtype changes (bytes are copied as they are) and every chunk fits a 32-bit archive; the result is
read by megatron-core's loader like any torch_dist checkpoint (the conversion tests load it at several layouts and
compare its DCP metadata with the regular path's). No torch here: the parent imports this module.
"""
from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from llamapro_megatron.arch import LlamaArch
from llamapro_megatron.checkpoint import dcp_index, mapping, torch_archive
from llamapro_megatron.checkpoint.hf import ST_DTYPES, HFReader
from llamapro_megatron.checkpoint.st_copy import copy_range, write_zeros
from llamapro_megatron.expansion import ExpansionPlan

DATA_FILE = "__direct_{}.distcp"
ENV_SWITCH = "LLAMAPRO_DIRECT_CONVERT"  # "0": always the regular path


class LayoutMismatch(RuntimeError):
    """megatron-core's sharded state dict is not the planned chunks (another megatron-core version?)."""


@dataclass(frozen=True)
class Piece:
    """`length` bytes of `path` from `offset`; zeros when path is None."""
    path: str | None
    offset: int
    length: int


@dataclass
class Chunk:
    """One stored chunk of a checkpoint tensor and where its bytes come from (and go)."""
    key: str  # checkpoint key: stacked over layers for decoder tensors
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    shape: tuple[int, ...]
    dtype: str
    pieces: tuple[Piece, ...]
    unit: str  # conversion unit (convert.unit_of), for balancing
    file: str = ""  # relative data file, set by assign_files
    file_offset: int = 0
    length: int = 0

    @property
    def nbytes(self) -> int:
        return sum(p.length for p in self.pieces)

    def descriptor(self) -> tuple:
        """What the checkpoint's metadata needs (no pieces): for the worker."""
        return (self.key, self.global_shape, self.offsets, self.shape, self.dtype, self.file, self.file_offset,
                self.length)


def enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1") != "0"


def plan_import(reader: HFReader, arch: LlamaArch, plan: ExpansionPlan, padded_vocab: int,
                dtype: str) -> list[Chunk] | str:
    """Every chunk of the converted checkpoint, or why the direct path does not apply (a reason)."""
    from llamapro_megatron.checkpoint.convert import unit_of  # (convert imports this module)

    itemsize = torch_archive.ITEMSIZE.get(dtype)
    if itemsize is None:
        return f"dtype {dtype}"
    h = arch.hidden_size
    L = plan.num_layers
    chunks: list[Chunk] = []

    def source(name: str) -> Piece | str:
        got = reader.dtype(name)
        if got != dtype:
            return f"{name} is {got}, the checkpoint {dtype}"
        path, offset, length = reader.byte_range(name)
        return Piece(str(path), offset, length)

    def add(key, global_shape, offsets, shape, pieces, unit) -> str | None:
        for p in pieces:
            if isinstance(p, str):
                return p
        if sum(p.length for p in pieces) != math.prod(shape) * itemsize:
            return f"{key}: sizes do not add up"
        if not torch_archive.supported(dtype, math.prod(shape) * itemsize):
            return f"{key}: chunk of {math.prod(shape) * itemsize} bytes"
        chunks.append(Chunk(key, tuple(global_shape), tuple(offsets), tuple(shape), dtype, tuple(pieces), unit))
        return None

    for t in mapping.global_tensors(arch):
        (hf_name,) = t.hf
        if t.kind == "vocab":
            src = source(hf_name)
            pad = (padded_vocab - arch.vocab_size) * h * itemsize
            pieces = [src] + ([Piece(None, 0, pad)] if pad else [])
            why = add(t.stored, (padded_vocab, h), (0, 0), (padded_vocab, h), pieces, unit_of(t.stored))
        else:
            why = add(t.stored, (h,), (0,), (h,), [source(hf_name)], unit_of(t.stored))
        if why:
            return why

    g, d = arch.num_query_groups, arch.head_dim
    q_rows = arch.num_attention_heads // g * d
    f = arch.ffn_hidden_size
    hf_shapes = mapping.expected_hf_shapes(arch)
    for layer in range(L):
        src_layer = plan.sources[layer]
        unit = f"layer{layer}"
        for t in mapping.LAYER_TENSORS:
            key = mapping.MCORE_LAYER_PREFIX + t.stored
            names = [f"{mapping.HF_LAYER_PREFIX}{src_layer}.{n}" for n in t.hf]
            # the megatron tensor stacks its HF tensors' rows (fused q/k/v, [gate; up])
            shape = (sum(hf_shapes[n][0] for n in names), *hf_shapes[names[0]][1:])
            if plan.is_new(layer) and t.zero_in_identity_copy:
                why = add(key, (L, *shape), (layer, *[0] * len(shape)), (1, *shape),
                          [Piece(None, 0, math.prod(shape) * itemsize)], unit)
            elif t.kind == "copy":
                why = add(key, (L, *shape), (layer, *[0] * len(shape)), (1, *shape), [source(names[0])], unit)
            elif t.kind == "qkv":
                q, k, v = (source(n) for n in names)
                bad = next((x for x in (q, k, v) if isinstance(x, str)), None)
                pieces = [bad] if bad else []
                if not bad:
                    row = h * itemsize
                    for group in range(g):  # megatron-core's fused layout: per query group, its q heads, k, v
                        pieces += [Piece(q.path, q.offset + group * q_rows * row, q_rows * row),
                                   Piece(k.path, k.offset + group * d * row, d * row),
                                   Piece(v.path, v.offset + group * d * row, d * row)]
                why = add(key, (L, *shape), (layer, 0, 0), (1, *shape), pieces, unit)
            elif t.kind == "gate_up":  # stored as SwiGLU's two halves: [gate; up]
                why = None
                for half, name in enumerate(names):
                    why = why or add(key, (L, 2 * f, h), (layer, half * f, 0), (1, f, h), [source(name)], unit)
            else:
                raise ValueError(t.kind)
            if why:
                return why
    return chunks


def assign_files(chunks: list[Chunk], workers: int) -> dict[str, list[Chunk]]:
    """Balance the chunks' units over `workers` data files by bytes; sets each chunk's file, offset and length."""
    from llamapro_megatron.checkpoint.convert import assign_units

    sizes: dict[str, int] = {}
    for c in chunks:
        sizes[c.unit] = sizes.get(c.unit, 0) + c.nbytes
    units = list(sizes)
    owner = assign_units(units, sizes, max(1, min(workers, len(units))))
    files: dict[str, list[Chunk]] = {}
    for c in chunks:
        files.setdefault(DATA_FILE.format(owner[c.unit]), []).append(c)
    for name, mine in files.items():
        offset = 0
        for serial, c in enumerate(mine):
            c.file, c.file_offset = name, offset
            c.length = torch_archive.frame(c.dtype, c.shape, serial).size
            offset += c.length
    return files


def _yield_cpu() -> None:
    """Lower this thread's CPU priority (Linux: nice is per thread). The copies are not the critical path: the
    worker's torch + megatron-core import is, and on a small machine the copying threads took CPU from it
    (1.2B model, 2 cores: 3.28 s vs 4.24 s median wall, 5 interleaved pairs; BENCHMARKS.md)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):
        pass


def write_file(path: Path, chunks: list[Chunk], progress: Callable[[int], None], stop: threading.Event) -> None:
    """Write one data file: each chunk's torch.save archive, its bytes copied in the kernel. Stops early (leaving a
    short file, which the caller removes) when `stop` is set."""
    _yield_cpu()
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), "wb", buffering=0) as out:
        for serial, c in enumerate(chunks):
            if stop.is_set():
                return
            fr = torch_archive.frame(c.dtype, c.shape, serial)
            out.write(fr.prefix)
            for p in c.pieces:
                if p.path is None:
                    write_zeros(out, p.length)
                else:
                    with open(p.path, "rb") as src:
                        copy_range(src, out, p.offset, p.length)
            out.write(fr.suffix)
            progress(c.nbytes)
        os.fsync(out.fileno())  # as PyTorch's DCP writer does before its metadata is written
    expected = sum(c.length for c in chunks)
    if os.path.getsize(path) != expected:
        raise OSError(f"{path}: wrote {os.path.getsize(path)} bytes, planned {expected}")


# --------------------------------------------------------------- mcore -> hf
# The export needs no megatron-core at all: the checkpoint's chunks are located through its DCP metadata
# (`dcp_index`, torch-free), and every HF tensor is a range of rows of one stored tensor, copied file to file into
# safetensors shards (`st_copy.write_pieces`). Chunks must split tensors by rows only (as this project's
# conversions, and TP splits of column-parallel weights, do); otherwise the regular path reads the checkpoint.
_ST_NAMES = {dtype: st for st, dtype in ST_DTYPES.items()}  # bfloat16 -> BF16


@dataclass(frozen=True)
class HFTensor:
    name: str
    shape: tuple[int, ...]
    pieces: tuple[Piece, ...]

    @property
    def nbytes(self) -> int:
        return sum(p.length for p in self.pieces)


def plan_export(ckpt_dir: str | Path, arch: LlamaArch, dtype: str, out_dtype: str) -> list[HFTensor] | str:
    """Every HF tensor of the export as byte ranges of the checkpoint's files, or why the direct path does not
    apply (a reason)."""
    if out_dtype != dtype or dtype not in _ST_NAMES:
        return f"export to {out_dtype} from a {dtype} checkpoint"
    try:
        index = dcp_index.read_tensor_index(ckpt_dir)
        rows = RowReader(Path(ckpt_dir), index, dtype)
        d, g = arch.head_dim, arch.num_query_groups
        q_rows = arch.num_attention_heads // g * d
        f = arch.ffn_hidden_size
        shapes = mapping.expected_hf_shapes(arch)
        tensors = []
        for t in mapping.global_tensors(arch):
            (name,) = t.hf
            tensors.append(HFTensor(name, shapes[name], rows(t.stored, None, 0, shapes[name][0])))
        for layer in range(arch.num_layers):
            prefix = f"{mapping.HF_LAYER_PREFIX}{layer}."
            for t in mapping.LAYER_TENSORS:
                key = mapping.MCORE_LAYER_PREFIX + t.stored
                names = [prefix + n for n in t.hf]
                if t.kind == "copy":
                    ranges = [[(0, shapes[names[0]][0])]]
                elif t.kind == "qkv":  # per query group: its q heads, then k, then v
                    group = q_rows + 2 * d
                    ranges = [[(i * group + start, i * group + start + n) for i in range(g)]
                              for start, n in ((0, q_rows), (q_rows, d), (q_rows + d, d))]
                elif t.kind == "gate_up":
                    ranges = [[(0, f)], [(f, 2 * f)]]
                else:
                    raise ValueError(t.kind)
                for name, spans in zip(names, ranges):
                    pieces = tuple(p for r0, r1 in spans for p in rows(key, layer, r0, r1))
                    tensors.append(HFTensor(name, shapes[name], pieces))
        for t in tensors:
            if t.nbytes != math.prod(t.shape) * torch_archive.ITEMSIZE[dtype]:
                return f"{t.name}: the checkpoint's chunks give {t.nbytes} bytes"
    except dcp_index.Unreadable as e:
        return str(e)
    return tensors


class RowReader:
    """Byte ranges of rows [r0, r1) of a stored tensor (of one layer of a stacked one), from chunks that each
    hold whole rows."""

    def __init__(self, ckpt_dir: Path, index: dict, dtype: str):
        self.dir, self.index, self.dtype = ckpt_dir, index, dtype
        self.itemsize = torch_archive.ITEMSIZE[dtype]
        self._starts: dict = {}

    def __call__(self, key: str, layer: int | None, r0: int, r1: int) -> list[Piece]:
        if key not in self.index:
            raise dcp_index.Unreadable(f"the checkpoint has no tensor {key}")
        t = self.index[key]
        if t.dtype != self.dtype:
            raise dcp_index.Unreadable(f"{key} is stored as {t.dtype}, the checkpoint says {self.dtype}")
        lead = 0 if layer is None else 1
        rest = t.size[lead:]  # rows, then the dimensions every chunk must hold whole
        row_bytes = math.prod(rest[1:]) * self.itemsize
        pieces, at = [], r0
        spans = []
        for c in t.chunks:
            if lead and (c.offsets[0] != layer or c.sizes[0] != 1):
                continue
            if any(c.offsets[lead + 1:]) or tuple(c.sizes[lead + 1:]) != tuple(rest[1:]):
                raise dcp_index.Unreadable(f"{key} is split by columns")
            spans.append((c.offsets[lead], c.offsets[lead] + c.sizes[lead], c))
        for start, end, c in sorted(spans, key=lambda s: s[0]):
            if end <= at or start >= r1:
                continue
            if start > at:
                break
            if c not in self._starts:
                self._starts[c] = dcp_index.tensor_data_offset(self.dir, c, t.dtype)
            stop = min(end, r1)
            pieces.append(Piece(str(self.dir / c.file), self._starts[c] + (at - start) * row_bytes,
                                (stop - at) * row_bytes))
            at = stop
        if at != r1:
            raise dcp_index.Unreadable(f"{key}: rows {at}..{r1} of layer {layer} are in no chunk")
        return pieces


def write_hf_shard(path: Path, tensors: list[HFTensor], dtype: str, progress: Callable[[int], None],
                   stop: threading.Event) -> None:
    from llamapro_megatron.checkpoint import st_copy

    if stop.is_set():
        return
    st_copy.write_pieces(path, [(t.name, _ST_NAMES[dtype], t.shape,
                                 [(p.path, p.offset, p.length) for p in t.pieces]) for t in tensors],
                         {"format": "pt"})
    progress(sum(t.nbytes for t in tensors))
