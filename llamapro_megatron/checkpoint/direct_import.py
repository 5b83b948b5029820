"""hf-to-mcore with the tensor data copied file to file while one process imports megatron-core.

Why: a worker's start (interpreter, torch, megatron-core) costs ~2-3 s on a 2-core machine, about what copying a
1.2B model's bytes costs, and the regular path (`regular_import.py`: workers build tensors and megatron-core's
dist_checkpointing writes them) can only start moving bytes after it. Here the work is split by what needs torch:

- The parent, which never imports torch, plans every tensor chunk of the checkpoint from the HF headers and the
  tensor description (`mapping`: each block of a stored tensor becomes one chunk) and threads copy each chunk's
  bytes from the safetensors files into `.distcp` data files, framed as the `torch.save` archives PyTorch's DCP
  reader expects (`dcp.archive`), in the kernel (`os.sendfile`).
- Meanwhile one spawned worker imports torch and megatron-core and gates the result: it builds the model on the meta
  device and checks that its sharded state dict is exactly the planned chunks, and it reads one of the written
  archives (the *probe*, written by the parent before the worker starts) back with `torch.load(weights_only=True)`,
  as DCP's reader does, and compares it with the source bytes. Either failing returns a reason (not an exception):
  the output is removed and the conversion reruns on the regular path with a one-line notice. Then it lets
  megatron-core's own `dist_checkpointing.save` write everything that is not a tensor chunk (extra-state objects,
  `common.pt`, `metadata.json`) and adds the planned chunks to the DCP metadata (`dcp.merge.add_saved_objects`).

Used when no dtype changes (bytes are copied as they are) and every chunk fits a 32-bit archive. No torch here at
import: the parent imports this module.
"""
from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from llamapro_megatron.arch import LlamaArch
from llamapro_megatron.checkpoint import integrity, mapping, output, units
from llamapro_megatron.checkpoint.dcp import archive
from llamapro_megatron.checkpoint.hf import HFReader
from llamapro_megatron.checkpoint.mcore import RELEASE
from llamapro_megatron.checkpoint.st_copy import Piece, copy_pieces
from llamapro_megatron.expansion import ExpansionPlan
from llamapro_megatron.progress import SharedProgress

DATA_FILE = "__direct_{}.distcp"


@dataclass
class Chunk:
    """One stored chunk of a checkpoint tensor and where its bytes come from (and go)."""
    key: str  # checkpoint key: stacked over layers for decoder tensors
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    shape: tuple[int, ...]
    dtype: str
    pieces: tuple[Piece, ...]
    unit: str  # for balancing (`units`)
    file: str = ""  # relative data file, set by assign_files
    file_offset: int = 0
    length: int = 0
    serial: int = 0  # its archive's serialization id: its place in its file

    @property
    def nbytes(self) -> int:
        return sum(p.length for p in self.pieces)

    def descriptor(self) -> tuple:
        """What the checkpoint's metadata needs (no pieces): for the worker."""
        return (self.key, self.global_shape, self.offsets, self.shape, self.dtype, self.file, self.file_offset,
                self.length)


def plan_import(reader: HFReader, arch: LlamaArch, plan: ExpansionPlan, padded_vocab: int,
                dtype: str) -> list[Chunk] | str:
    """Every chunk of the converted checkpoint, or why the direct path does not apply (a reason)."""
    if dtype not in archive.ITEMSIZE:
        return f"dtype {dtype}"
    desc = mapping.Description(arch, padded_vocab)

    def source(name: str) -> tuple[str, int, int] | str:
        got = reader.dtype(name)
        return f"{name} is {got}, the checkpoint {dtype}" if got != dtype else reader.byte_range(name)

    chunks: list[Chunk] = []
    work = [(t, None, None, False) for t in desc.globals]
    work += [(t, layer, plan.sources[layer], plan.is_new(layer) and t.zero_in_identity_copy)
             for layer in range(plan.num_layers) for t in desc.layer]
    for t, layer, src_layer, zero in work:
        mine = chunks_of(t, layer, plan.num_layers, dtype, None if zero else
                         (lambda rel, src_layer=src_layer: source(mapping.hf_name(rel, src_layer))))
        if isinstance(mine, str):
            return mine
        chunks += mine
    return chunks


def chunks_of(t: mapping.StoredTensor, layer: int | None, num_layers: int, dtype: str,
              source: Callable[[str], tuple[str, int, int] | str] | None) -> list[Chunk] | str:
    """The chunks of one stored tensor (of one layer): one per block of the description, each the byte ranges of
    its HF row spans; `source(hf_name) -> (file, offset, length)` of a whole HF tensor (or why it cannot be
    copied), None for zeros (an identity copy's zeroed projection)."""
    itemsize = archive.ITEMSIZE[dtype]
    lead = t.lead(layer)
    row_bytes = t.row_elements * itemsize
    unit = units.unit_of(t.name) if layer is None else units.layer_unit(layer)
    chunks = []
    for block, start in zip(t.blocks, t.block_offsets()):
        rows = sum(r.count for r in block)
        pieces = []
        for r in ([mapping.Rows(None, 0, rows)] if source is None else block):
            if r.hf is None:
                pieces.append(Piece(None, 0, r.count * row_bytes))
                continue
            located = source(r.hf)
            if isinstance(located, str):
                return located
            path, offset, _ = located
            pieces.append(Piece(str(path), offset + r.start * row_bytes, r.count * row_bytes))
        shape = (*[1] * len(lead), rows, *t.shape[1:])
        if not archive.supported(dtype, math.prod(shape) * itemsize):
            return f"{t.key}: chunk of {math.prod(shape) * itemsize} bytes"
        offsets = (*lead, start, *[0] * (len(t.shape) - 1))
        chunks.append(Chunk(mapping.stored_key(t, layer), t.stored_shape(None if layer is None else num_layers),
                            offsets, shape, dtype, tuple(pieces), unit))
    return chunks


def assign_files(chunks: list[Chunk], workers: int) -> dict[str, list[Chunk]]:
    """Balance the chunks' units over `workers` data files by bytes; sets each chunk's file, offset and length."""
    sizes: dict[str, int] = {}
    for c in chunks:
        sizes[c.unit] = sizes.get(c.unit, 0) + c.nbytes
    unit_names = list(sizes)
    owner = units.assign_units(unit_names, sizes, max(1, min(workers, len(unit_names))))
    files: dict[str, list[Chunk]] = {}
    for c in chunks:
        files.setdefault(DATA_FILE.format(owner[c.unit]), []).append(c)
    for name, mine in files.items():
        offset = 0
        for serial, c in enumerate(mine):
            c.file, c.file_offset, c.serial = name, offset, serial
            c.length = archive.frame(c.dtype, c.shape, serial).size
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


def write_chunk(out, c: Chunk) -> None:
    """One chunk's torch.save archive at its place in the open data file `out`."""
    fr = archive.frame(c.dtype, c.shape, c.serial)
    out.seek(c.file_offset)
    out.write(fr.prefix)
    copy_pieces(out, list(c.pieces))
    out.write(fr.suffix)


def write_file(path: Path, chunks: list[Chunk], progress: Callable[[int], None], stop: threading.Event,
               skip: Chunk | None = None) -> str | None:
    """Write one data file's chunks (but `skip`, written already) and return its digest (`integrity`: read back while
    the bytes are in the page cache, off the critical path like the copy); stops early (leaving a short file, which
    the caller removes, and returning None) when `stop` is set."""
    _yield_cpu()
    with open(os.open(path, os.O_WRONLY | os.O_CREAT, 0o644), "wb", buffering=0) as out:
        for c in chunks:
            if stop.is_set():
                return None
            if c is not skip:
                write_chunk(out, c)
                progress(c.nbytes)
        os.fsync(out.fileno())  # as PyTorch's DCP writer does before its metadata is written
    expected = sum(c.length for c in chunks)
    if os.path.getsize(path) != expected:
        raise OSError(f"{path}: wrote {os.path.getsize(path)} bytes, planned {expected}")
    return integrity.digest(path)


# ------------------------------------------------------------------ the conversion
@dataclass
class DirectImportJob:
    out: str
    arch: dict
    padded_vocab: int
    dtype: str
    num_layers: int
    meta_json: str
    chunks: list[tuple]  # Chunk.descriptor()s
    probe: tuple  # (file, offset, length, dtype, shape, pieces) of the archive to read back


def convert(job, chunks: list[Chunk], workers: int) -> str | None:
    """Write the checkpoint `job` (a `convert.ImportJob`) describes from the planned `chunks` with `workers` copying
    threads. Returns None when written, or why megatron-core / torch did not confirm the plan (nothing is left)."""
    from concurrent.futures import ThreadPoolExecutor

    from llamapro_megatron.runtime.launch import WorkerError, run_workers

    output.require_workers(workers)
    out = Path(job.out)
    tmp = output.start_output(out)
    release_dir = tmp / RELEASE
    release_dir.mkdir()
    files = assign_files(chunks, workers)
    probe = min(chunks, key=lambda c: (c.nbytes, c.file, c.file_offset))
    meta_job = DirectImportJob(job.out, job.arch, job.padded_vocab, job.dtype, job.plan.num_layers, job.meta_json,
                               [c.descriptor() for c in chunks],
                               (probe.file, probe.file_offset, probe.length, probe.dtype, probe.shape, probe.pieces))
    stop = threading.Event()
    bar = SharedProgress(None, 0, 1, sum(c.nbytes for c in chunks), "hf-to-mcore", job.progress)
    t0 = time.time()
    try:
        with output.removed_on_failure(tmp, out), ThreadPoolExecutor(len(files)) as pool:
            with open(os.open(release_dir / probe.file, os.O_WRONLY | os.O_CREAT, 0o644), "wb", buffering=0) as f:
                write_chunk(f, probe)  # before the worker starts: it reads this one back
            bar.update(probe.nbytes)
            copies = [pool.submit(write_file, release_dir / name, mine, bar.update, stop, probe)
                      for name, mine in files.items()]
            try:
                # its files are complete (fsynced) when it reports: its interpreter's exit is not waited for
                (reason,) = run_workers(confirm_and_finish, 1, args=(meta_job,), env={"CUDA_VISIBLE_DEVICES": ""},
                                        skip_exits=True)
            except WorkerError as e:
                stop.set()
                raise output.failed(out, output.last_line(e)) from e
            except BaseException:
                stop.set()
                raise
            if reason is not None:
                stop.set()
                raise _NotConfirmed(reason)
            digests = {name: copy.result() for name, copy in zip(files, copies)}
    except _NotConfirmed as e:
        return str(e)
    finally:
        bar.close()
    output.commit_release(tmp, out, job.meta_json, Path(job.hf_dir), digests)
    if job.progress:
        print(f"hf-to-mcore: wrote {out} ({len(chunks)} tensor chunks in {len(files)} files, "
              f"{time.time() - t0:.1f}s)", flush=True)
    return None


class _NotConfirmed(Exception):
    """The worker's gate said no (removes the output on its way out, like any failure)."""


def confirm_and_finish(job: DirectImportJob) -> str | None:
    """The worker: gate the plan (layout, probe read-back); write everything else. Returns why not, or None."""
    from llamapro_megatron.checkpoint.dcp.merge import add_saved_objects
    from llamapro_megatron.runtime.dist_ckpt import save
    from llamapro_megatron.runtime.distributed import init_distributed

    init_distributed(tp=1, pp=1)  # prepares megatron-core: import it only after this
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensorFactory

    from llamapro_megatron.runtime.model import build_gpt_model

    arch = LlamaArch.from_dict(job.arch)
    model = build_gpt_model(arch, job.padded_vocab, dtype=job.dtype, meta_device=True, num_layers=job.num_layers)
    objects, expected = {}, set()
    for name, entry in model.sharded_state_dict().items():
        if isinstance(entry, ShardedObject):
            entry.replica_id = 0
            objects[name] = entry
            continue
        for t in entry.build() if isinstance(entry, ShardedTensorFactory) else [entry]:
            # (the meta model's dtypes are not the checkpoint's: the regular path casts every tensor to it too)
            sizes = (1,) * t.prepend_axis_num + tuple(t.local_shape)
            flat = "flattened" if t.flattened_range is not None else ""
            expected.add((t.key, tuple(t.global_shape), tuple(t.global_offset), sizes, flat))
    planned = {(key, tuple(shape), tuple(offsets), tuple(sizes), "") for key, shape, offsets, sizes, *_ in job.chunks}
    if planned != expected:
        diff = sorted(planned ^ expected)[:2]
        return f"megatron-core's sharded state dict is not the planned layout (e.g. {diff})"
    release_dir = output.partial_dir(Path(job.out)) / RELEASE
    reason = read_back(release_dir, *job.probe)
    if reason:
        return reason
    save_dir = release_dir / ".objects"
    save_dir.mkdir()
    save({"model": objects, **output.release_common(job.meta_json)}, str(save_dir))
    add_saved_objects(save_dir, release_dir, job.chunks)
    # no destroy_distributed(): the parent stops this one-rank world once it has reported (skip_exits), and the
    # teardown of gloo and megatron's groups took ~0.12 s of the conversion's critical path
    return None


def read_back(release_dir: Path, file: str, offset: int, length: int, dtype: str, shape: tuple,
              pieces: tuple) -> str | None:
    """Read one written archive as DCP's reader does (`torch.load(weights_only=True)` of its byte range) and compare
    it with its source bytes; returns what differs, or None."""
    import io

    import torch

    with open(release_dir / file, "rb") as f:
        f.seek(offset)
        raw = f.read(length)
    try:
        tensor = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as e:  # any failure of this torch to read our archive means: do not use the direct path
        return f"this torch cannot read the direct path's archives ({type(e).__name__}: {e})"
    want = b"".join(bytes(p.length) if p.path is None else _read(p) for p in pieces)
    if (not isinstance(tensor, torch.Tensor) or str(tensor.dtype) != f"torch.{dtype}"
            or tuple(tensor.shape) != tuple(shape) or tensor.contiguous().view(torch.uint8).numpy().tobytes() != want):
        return "an archive of the direct path reads back differently with this torch"
    return None


def _read(p: Piece) -> bytes:
    with open(p.path, "rb") as f:
        f.seek(p.offset)
        return f.read(p.length)
