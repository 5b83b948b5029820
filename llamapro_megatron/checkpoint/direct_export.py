"""mcore-to-hf without megatron-core or torch: every HF tensor copied as row ranges of the checkpoint's chunks.

The checkpoint's chunks are located through its DCP metadata (`dcp.index`, torch-free and refusing what it does not
recognise), and every HF tensor is the row spans the tensor description gives it (`mapping.hf_row_spans`), copied
file to file into safetensors shards (`st_copy.write_pieces`) by threads. Chunks must split tensors by rows only (as
this project's conversions, and TP splits of column-parallel weights, do); otherwise the regular path
(`regular_export.py`) reads the checkpoint. The output is byte-identical to the regular export (tested).
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from pathlib import Path

from llamapro_megatron.arch import LlamaArch
from llamapro_megatron.checkpoint import hf as hfio
from llamapro_megatron.checkpoint import mapping, output, st_copy, units
from llamapro_megatron.checkpoint.dcp import index as dcp_index
from llamapro_megatron.checkpoint.dcp.archive import ITEMSIZE
from llamapro_megatron.checkpoint.regular_export import finish_export
from llamapro_megatron.checkpoint.st_copy import Piece
from llamapro_megatron.progress import SharedProgress

_ST_NAMES = {dtype: st for st, dtype in hfio.ST_DTYPES.items()}  # bfloat16 -> BF16


@dataclass(frozen=True)
class HFTensor:
    name: str
    shape: tuple[int, ...]
    pieces: tuple[Piece, ...]

    @property
    def nbytes(self) -> int:
        return sum(p.length for p in self.pieces)


def plan_export(ckpt_dir: str | Path, arch: LlamaArch, padded_vocab: int, dtype: str,
                out_dtype: str) -> list[HFTensor] | str:
    """Every HF tensor of the export as byte ranges of the checkpoint's files, or why the direct path does not
    apply (a reason)."""
    if out_dtype != dtype or dtype not in _ST_NAMES:
        return f"export to {out_dtype} from a {dtype} checkpoint"
    desc = mapping.Description(arch, padded_vocab)
    shapes = mapping.expected_hf_shapes(arch)
    try:
        rows = RowReader(Path(ckpt_dir), dcp_index.read_tensor_index(ckpt_dir), dtype)
        tensors = [h for layer, t in [(None, t) for t in desc.globals] + [(i, t) for i in range(arch.num_layers)
                                                                           for t in desc.layer]
                   for h in hf_tensors_of(t, layer, rows, shapes)]
        for t in tensors:
            if t.nbytes != math.prod(t.shape) * ITEMSIZE[dtype]:
                return f"{t.name}: the checkpoint's chunks give {t.nbytes} bytes"
    except dcp_index.Unreadable as e:
        return str(e)
    return tensors


def hf_tensors_of(t: mapping.StoredTensor, layer: int | None, rows: RowReader,
                  shapes: dict[str, tuple[int, ...]]) -> list[HFTensor]:
    """The HF tensors of one stored tensor (of one layer): the row spans the description gives each, located in the
    checkpoint's chunks; `shapes`: HF tensor shapes by full name."""
    key = mapping.stored_key(t, layer)
    out = []
    for rel, spans in mapping.hf_row_spans(t).items():
        name = mapping.hf_name(rel, layer)
        out.append(HFTensor(name, shapes[name], tuple(p for r0, r1 in spans for p in rows(key, t.lead(layer), r0, r1))))
    return out


class RowReader:
    """Byte ranges of rows [r0, r1) of a stored tensor (of one layer, one expert of a stacked one), from chunks that
    each hold whole rows."""

    def __init__(self, ckpt_dir: Path, index: dict, dtype: str):
        self.dir, self.index, self.dtype = ckpt_dir, index, dtype
        self.itemsize = ITEMSIZE[dtype]
        self._starts: dict = {}

    def __call__(self, key: str, lead: tuple[int, ...], r0: int, r1: int) -> list[Piece]:
        """`lead`: the indices on the leading (layer, expert) axes; () for a global tensor."""
        if key not in self.index:
            raise dcp_index.Unreadable(f"the checkpoint has no tensor {key}")
        t = self.index[key]
        if t.dtype != self.dtype:
            raise dcp_index.Unreadable(f"{key} is stored as {t.dtype}, the checkpoint says {self.dtype}")
        n = len(lead)
        rest = t.size[n:]  # rows, then the dimensions every chunk must hold whole
        row_bytes = math.prod(rest[1:]) * self.itemsize
        spans = []
        for c in t.chunks:
            if tuple(c.offsets[:n]) != lead or any(size != 1 for size in c.sizes[:n]):
                continue
            if any(c.offsets[n + 1:]) or tuple(c.sizes[n + 1:]) != tuple(rest[1:]):
                raise dcp_index.Unreadable(f"{key} is split by columns")
            spans.append((c.offsets[n], c.offsets[n] + c.sizes[n], c))
        pieces, at = [], r0
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
            raise dcp_index.Unreadable(f"{key}: rows {at}..{r1} at {lead} are in no chunk")
        return pieces


def export(job, arch: LlamaArch, tensors: list[HFTensor], workers: int) -> None:
    """Write the HF directory `job` (a `convert.ExportJob`) describes: `workers` threads copy each shard's tensors
    from the checkpoint's files; one shard per unit, as the regular export writes them."""
    from concurrent.futures import ThreadPoolExecutor

    output.require_workers(workers)
    out = Path(job.out)
    tmp = output.start_output(out)
    unit_names = units.unit_names(arch.num_layers)
    shards: dict[str, list[HFTensor]] = {u: [] for u in unit_names}
    for t in tensors:
        shards[units.hf_unit_of(t.name)].append(t)
    sizes = {u: sum(t.nbytes for t in mine) for u, mine in shards.items()}
    owner = units.assign_units(unit_names, sizes, max(1, min(workers, len(unit_names))))
    stop = threading.Event()
    bar = SharedProgress(None, 0, 1, sum(sizes.values()), "mcore-to-hf", job.progress)

    def write(w: int) -> None:
        for u in unit_names:
            if owner[u] == w and not stop.is_set():
                st_copy.write_pieces(tmp / hfio.shard_name(unit_names.index(u), len(unit_names)),
                                     [(t.name, _ST_NAMES[job.dtype], t.shape, list(t.pieces)) for t in shards[u]],
                                     {"format": "pt"})
                bar.update(sizes[u])

    threads = max(owner.values()) + 1
    try:
        with output.removed_on_failure(tmp, out), ThreadPoolExecutor(threads) as pool:
            copies = [pool.submit(write, w) for w in range(threads)]
            try:
                for copy in copies:
                    copy.result()
            except BaseException:
                stop.set()
                raise
    finally:
        bar.close()
    finish_export(tmp, out, arch, unit_names, job.dtype, Path(job.ckpt_dir), job.progress)
