"""HF <-> Megatron conversion: streaming, parallel across workers, exact.

A torch_dist checkpoint stores global tensors in chunks, so any number of workers can each write (or read) a
share of them: the work is cut into *units* (the embedding; final norm + output layer; one unit per decoder
layer), units are balanced over workers by bytes, and each worker reads only its units' tensors. Workers form a
gloo world at TP=1 PP=1; each builds the model on the meta device for megatron-core's own sharded_state_dict
(keys, global shapes, the SwiGLU factory, extra-state objects), fills the entries it owns and the world saves
(or loads) together through megatron-core's dist_checkpointing. `--tp/--pp` validate and are recorded only.

Output is assembled in `OUT.partial` and renamed to OUT at the very end. The parent process only validates and
spawns the workers: it never imports torch (workers start ~1.5 s sooner).

When no dtype changes, both directions take the *direct* path (`direct.py`) instead: the parent copies tensor
bytes file to file with threads, and only hf-to-mcore starts a process (one, to check the layout against
megatron-core and write the checkpoint's metadata). The regular path above remains for dtype changes, torchrun
launches, checkpoints the direct reader does not handle, and `LLAMAPRO_DIRECT_CONVERT=0`.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from llamapro_megatron.arch import LlamaArch, canonical_dtype, dtype_bytes
from llamapro_megatron.checkpoint import direct, mapping, trainable
from llamapro_megatron.checkpoint import hf as hfio
from llamapro_megatron.checkpoint.mcore import (
    LATEST_FILE,
    META_FILE,
    RELEASE,
    TOKENIZER_DIR,
    CheckpointMeta,
    build_gpt_model,
    check_output,
    commit_output,
    partial_dir,
    read_meta,
    resolve_checkpoint,
)
from llamapro_megatron.checkpoint.rounds import plan_rounds, save_in_rounds
from llamapro_megatron.errors import UserError
from llamapro_megatron.expansion import ExpansionPlan, compose
from llamapro_megatron.progress import SharedProgress

EMBED_UNIT, HEAD_UNIT = "embedding", "head"
ROUND_BYTES = 512 << 20  # per worker and round: bounds a worker's memory whatever the model size


# --------------------------------------------------------------------- units
def unit_of(mcore_name: str) -> str:
    layer, rel = mapping.split_layer_name(mcore_name)
    if layer is not None:
        return f"layer{layer}"
    return EMBED_UNIT if rel.startswith("embedding.") else HEAD_UNIT


def assign_units(units: list[str], sizes: dict[str, int], workers: int) -> dict[str, int]:
    """Greedy largest-first balancing of units over workers by bytes (deterministic)."""
    load = [0] * workers
    owner = {}
    for u in sorted(units, key=lambda u: (-sizes[u], units.index(u))):
        w = min(range(workers), key=lambda i: (load[i], i))
        owner[u] = w
        load[w] += sizes[u]
    return owner


def _per_layer_bytes(arch: LlamaArch, itemsize: int) -> int:
    h, f = arch.hidden_size, arch.ffn_hidden_size
    q, kv = arch.num_attention_heads * arch.head_dim, arch.num_query_groups * arch.head_dim
    return (2 * h + (q + 2 * kv) * h + h * q + 3 * f * h) * itemsize


def unit_sizes(arch: LlamaArch, padded_vocab: int, itemsize: int, num_layers: int) -> dict[str, int]:
    h = arch.hidden_size
    sizes = {EMBED_UNIT: padded_vocab * h * itemsize,
             HEAD_UNIT: (h + (0 if arch.tie_word_embeddings else padded_vocab * h)) * itemsize}
    per_layer = _per_layer_bytes(arch, itemsize)
    sizes.update({f"layer{i}": per_layer for i in range(num_layers)})
    return sizes


# --------------------------------------------------------------- hf -> mcore
@dataclass
class ImportJob:
    hf_dir: str
    out: str
    arch: dict
    padded_vocab: int
    dtype: str
    meta_json: str
    plan: ExpansionPlan
    overwrite: bool
    progress: bool = True
    round_bytes: int = ROUND_BYTES


def hf_to_mcore(hf_dir: str | Path, out: str | Path, *, tp: int = 1, pp: int = 1, vpp: int | None = None,
                dtype: str | None = None, workers: int = 1, overwrite: bool = False,
                plan: ExpansionPlan | None = None, make_vocab_size_divisible_by: int = 128,
                progress: bool = True, round_bytes: int | None = None) -> Path:
    """Convert a HF LLaMA-family directory into a Megatron-LM style torch_dist checkpoint at `out`.

    With an expansion `plan` the checkpoint is written expanded in the same pass (identity copies).
    """
    hf_dir, out = Path(hf_dir), check_output(out, overwrite)
    arch = LlamaArch.from_hf_dir(hf_dir)
    plan = plan or ExpansionPlan.identity(arch.num_layers)
    if plan.source_num_layers != arch.num_layers:
        raise UserError(f"the expansion plan is for {plan.source_num_layers} layers; {hf_dir} has {arch.num_layers}")
    num_layers = plan.num_layers
    arch.validate_layout(tp, pp, vpp, num_layers=num_layers)
    reader = hfio.HFReader(hf_dir)
    hfio.validate_hf_tensors(reader, mapping.expected_hf_shapes(arch))
    dtype = canonical_dtype(dtype or arch.dtype)
    padded = arch.padded_vocab_size(tp, make_vocab_size_divisible_by)
    out_arch = arch.replace(num_layers=num_layers)
    meta = CheckpointMeta(arch=out_arch, padded_vocab_size=padded, dtype=dtype,
                          layout={"tp": tp, "pp": pp, "vpp": vpp},
                          source={"kind": "huggingface", "path": str(hf_dir.resolve())},
                          expansion=compose(None, plan) if plan.new_indices else None)
    job = ImportJob(str(hf_dir), str(out), out_arch.to_dict(), padded, dtype, meta.to_json(), plan, overwrite,
                    progress, ROUND_BYTES if round_bytes is None else round_bytes)
    from llamapro_megatron.runtime.launch import inside_launcher

    if direct.enabled() and not inside_launcher():
        chunks = direct.plan_import(reader, arch, plan, padded, dtype)
        if isinstance(chunks, list):
            try:
                _hf_to_mcore_direct(job, chunks, workers)
                return out
            except direct.LayoutMismatch as e:
                print(f"hf-to-mcore: {e}; converting through megatron-core's writer instead", file=sys.stderr)
    itemsize = dtype_bytes(dtype)
    run_job(_import_worker, job, workers, out, sum(unit_sizes(out_arch, padded, itemsize, num_layers).values()))
    return out


def _hf_to_mcore_direct(job: ImportJob, chunks: list[direct.Chunk], workers: int) -> None:
    """hf-to-mcore through `direct`: `workers` threads copy the tensor bytes while one spawned process imports
    megatron-core and writes the rest (see the module). Raises `direct.LayoutMismatch` having removed its output."""
    from concurrent.futures import ThreadPoolExecutor

    from llamapro_megatron.runtime.launch import WorkerError, run_workers

    require_workers(workers)
    out = Path(job.out)
    tmp = partial_dir(out)
    shutil.rmtree(tmp, ignore_errors=True)
    release_dir = tmp / RELEASE
    release_dir.mkdir(parents=True)
    files = direct.assign_files(chunks, workers)
    meta_job = DirectImportJob(job.out, job.arch, job.padded_vocab, job.dtype, job.plan.num_layers, job.meta_json,
                               [c.descriptor() for c in chunks])
    stop = threading.Event()
    bar = _ThreadedBar(sum(c.nbytes for c in chunks), "hf-to-mcore", job.progress)
    t0 = time.time()
    with _output_or_nothing(tmp, out, bar), ThreadPoolExecutor(len(files)) as pool:
        copies = [pool.submit(direct.write_file, release_dir / name, mine, bar.update, stop)
                  for name, mine in files.items()]
        try:
            # its files are complete (fsynced) when it reports: its interpreter's exit is not waited for
            run_workers(_direct_import_worker, 1, args=(meta_job,), env={"CUDA_VISIBLE_DEVICES": ""},
                        skip_exits=True)
        except WorkerError as e:
            stop.set()
            lines = (e.remote_traceback or str(e)).strip().splitlines()
            last = lines[-1] if lines else str(e)
            if direct.LayoutMismatch.__name__ in last:
                raise direct.LayoutMismatch(last.split(": ", 1)[-1]) from e
            raise UserError(f"writing {out} failed, nothing was written there: {last}") from e
        except BaseException:
            stop.set()
            raise
        for copy in copies:
            copy.result()
    commit_release(tmp, out, job.meta_json, Path(job.hf_dir))
    if job.progress:
        print(f"hf-to-mcore: wrote {out} ({len(chunks)} tensor chunks in {len(files)} files, "
              f"{time.time() - t0:.1f}s)", flush=True)


@contextlib.contextmanager
def _output_or_nothing(tmp: Path, out: Path, bar: _ThreadedBar):
    """Remove the partial output `tmp` on any failure; a failed copy (disk full, ...) becomes one clear error."""
    try:
        yield
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"writing {out} failed, nothing was written there: {e}") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()


class _ThreadedBar:
    """A tqdm bar several copying threads update."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self._lock = threading.Lock()
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
                             dynamic_ncols=True, mininterval=0.5)

    def update(self, n: int) -> None:
        if self._bar is not None:
            with self._lock:
                self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


@dataclass
class DirectImportJob:
    out: str
    arch: dict
    padded_vocab: int
    dtype: str
    num_layers: int
    meta_json: str
    chunks: list[tuple]  # direct.Chunk.descriptor()s


def _direct_import_worker(job: DirectImportJob) -> None:
    """Check the planned chunks against megatron-core's sharded state dict; write everything else (see `direct`)."""
    from llamapro_megatron.checkpoint.rounds import add_saved_objects
    from llamapro_megatron.runtime.checkpointing import save
    from llamapro_megatron.runtime.distributed import init_distributed

    init_distributed(tp=1, pp=1)  # prepares megatron-core: import it only after this
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensorFactory

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
        raise direct.LayoutMismatch(f"megatron-core's sharded state dict is not the planned layout (e.g. {diff})")
    release_dir = partial_dir(Path(job.out)) / RELEASE
    save_dir = release_dir / ".objects"
    save_dir.mkdir()
    common = release_common(job.meta_json)
    save({"model": objects, **common}, str(save_dir))
    add_saved_objects(save_dir, release_dir, job.chunks)
    # no destroy_distributed(): the parent stops this one-rank world once it has reported (skip_exits), and the
    # teardown of gloo and megatron's groups took ~0.12 s of the conversion's critical path


def require_workers(workers: int) -> None:
    if workers < 1:
        raise UserError(f"--workers {workers}: need at least 1")


def run_job(worker, job, workers: int, out: Path, total_bytes: int = 0) -> None:
    """Run a worker function on this launch's ranks (torchrun) or on `workers` spawned processes.

    If any worker fails, the partial output is removed and the failure is reported as one message (each
    worker's traceback is on stderr): nothing half-written is left that looks like a result.
    """
    from llamapro_megatron.runtime.launch import WorkerError, inside_launcher, run_workers

    require_workers(workers)
    if inside_launcher():
        worker(job)
        return
    if workers == 1 and total_bytes > job.round_bytes:
        workers = 2  # a single rank cannot work in rounds (see worker_rounds); two keep memory bounded
    try:
        # Conversion is host work: spawned workers see no GPU, so any number of them runs on a box of any GPU count
        # (NCCL would pin worker i to GPU i) and a training job's GPUs stay untouched.
        run_workers(worker, workers, args=(job,), env={"CUDA_VISIBLE_DEVICES": ""})
    except WorkerError as e:
        shutil.rmtree(partial_dir(out), ignore_errors=True)
        lines = (e.remote_traceback or str(e)).strip().splitlines()
        raise UserError(f"writing {out} failed, nothing was written there: {lines[-1] if lines else e}") from e


def start_release_output(out: Path):
    """Every worker joins the TP=1 PP=1 world; rank 0 starts a clean `OUT.partial/release`."""
    import torch.distributed as dist

    from llamapro_megatron.runtime.distributed import init_distributed

    info = init_distributed(tp=1, pp=1)
    tmp = partial_dir(out)
    if info.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / RELEASE).mkdir(parents=True)
    dist.barrier()
    return info, tmp


def finish_release_output(info, tmp: Path, out: Path, meta_json: str, tokenizer_src: Path) -> None:
    """After the collective save: rank 0 adds metadata, latest pointer and tokenizer, then renames into place."""
    import torch.distributed as dist

    from llamapro_megatron.runtime.distributed import destroy_distributed

    dist.barrier()
    if info.rank == 0:
        commit_release(tmp, out, meta_json, tokenizer_src)
    dist.barrier()
    destroy_distributed()


def commit_release(tmp: Path, out: Path, meta_json: str, tokenizer_src: Path) -> None:
    """Once the torch_dist files are in `tmp/release`: metadata, latest pointer and tokenizer; rename to `out`."""
    (tmp / RELEASE / META_FILE).write_text(meta_json)
    (tmp / LATEST_FILE).write_text(RELEASE)
    hfio.copy_tokenizer_files(tokenizer_src, tmp / RELEASE / TOKENIZER_DIR)
    shutil.rmtree(tmp / ".progress", ignore_errors=True)
    commit_output(tmp, out)


def release_common(meta_json: str) -> dict:
    """The non-sharded part of a converted (release) checkpoint, as megatron-core saves it in common.pt."""
    return {"checkpoint_version": 3.0, "iteration": 0, "llamapro": json.loads(meta_json)}


def _import_worker(job: ImportJob) -> None:
    import torch

    out = Path(job.out)
    info, tmp = start_release_output(out)  # prepares megatron-core: import it only after this
    arch = LlamaArch.from_dict(job.arch)
    dtype = getattr(torch, job.dtype)
    num_layers = job.plan.num_layers
    model = build_gpt_model(arch, job.padded_vocab, dtype=job.dtype, meta_device=True, num_layers=num_layers)
    sizes = unit_sizes(arch, job.padded_vocab, dtype.itemsize, num_layers)
    owner = assign_units(list(sizes), sizes, info.world_size)
    reader = hfio.HFReader(job.hf_dir)
    # the bar counts each byte twice: once read and assembled, once written
    bar = SharedProgress(tmp / ".progress", info.rank, info.world_size, total=2 * sum(sizes.values()),
                         desc="hf-to-mcore", enabled=job.progress)
    entries = entries_by_unit(model.sharded_state_dict())

    def rounds():
        for units in worker_rounds(owner, sizes, info.rank, info.world_size, job.round_bytes):
            owned = {}
            for unit in units:
                for name, entry in entries.get(unit, []):
                    owned[name] = _import_entry(name, entry, job, arch, reader, dtype, bar)
            yield owned
            bar.update(sum(sizes[u] for u in units))
            release(owned)
            reader.release()  # unmap the source files: their pages would count against this worker

    common = release_common(job.meta_json)
    t0 = time.time()
    save_in_rounds(rounds(), tmp / RELEASE, common)
    bar.close()  # after the collective save: every rank's bytes are in
    finish_release_output(info, tmp, out, job.meta_json, Path(job.hf_dir))
    if info.rank == 0 and job.progress:
        print(f"hf-to-mcore: wrote {out} ({len(sizes)} units on {info.world_size} workers in "
              f"{time.time() - t0:.1f}s)", flush=True)


def _import_entry(name: str, entry, job: ImportJob, arch: LlamaArch, reader: hfio.HFReader, dtype, bar):
    """One meta sharded-state-dict entry filled from its HF tensors, as the main replica; returns what to save.

    A new layer's zeroed projections (identity copy) are zeros; the SwiGLU factory becomes its two built halves
    ([gate; up]), each given its HF tensor, rather than concatenating them for the factory to split them again.
    """
    import torch
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    if name.endswith("._extra_state"):
        entry.replica_id = 0
        return entry
    layer, tmap = mapping.lookup(name)
    if layer is not None and job.plan.is_new(layer) and tmap.zero_in_identity_copy:
        tensor = torch.zeros(entry_shape(entry), dtype=dtype)
    else:
        src = name if layer is None else f"decoder.layers.{job.plan.sources[layer]}.{tmap.mcore}"
        hf_tensors = [reader.get(n) for n in mapping.hf_names(src)]
        if isinstance(entry, ShardedTensorFactory) and tmap.kind == "gate_up":
            halves = entry.build()
            for half, part in zip(halves, hf_tensors):
                fill_entry(half, part.to(dtype).contiguous(), name)
            bar.update(sum(h.data.numel() * h.data.element_size() for h in halves))
            return halves
        tensor = mapping.to_mcore(tmap, hf_tensors, arch, job.padded_vocab).to(dtype)
    fill_entry(entry, tensor.contiguous(), name)
    bar.update(tensor.numel() * tensor.element_size())
    return entry


def worker_rounds(owner: dict[str, int], sizes: dict[str, int], rank: int, world_size: int,
                  budget: int = ROUND_BYTES) -> list[list[str]]:
    """This rank's units in rounds, padded with empty rounds to the world's round count (saves are collective).

    A one-rank world works in a single round: megatron-core turns a ShardedTensor that covers part of a tensor
    into a PyTorch ShardedTensor by attributing the rest to rank (rank + 1) % world_size (`strategies/torch.py`,
    `sharded_tensor_to_torch_sharded_tensor`), which with one rank is itself. `run_job` therefore starts two
    workers when one was asked for and the model does not fit one round.
    """
    if world_size == 1:
        return [list(owner)]
    per_rank = [plan_rounds([u for u in owner if owner[u] == w], sizes, budget) for w in range(world_size)]
    count = max(len(r) for r in per_rank)
    return per_rank[rank] + [[] for _ in range(count - len(per_rank[rank]))]


def entries_by_unit(sharded: dict) -> dict[str, list]:
    """A model's sharded-state-dict entries grouped by conversion unit."""
    grouped: dict[str, list] = {}
    for name, entry in sharded.items():
        grouped.setdefault(unit_of(name), []).append((name, entry))
    return grouped


def release(entries: dict) -> None:
    """Drop the tensors of entries already used, so a round's memory is freed before the next."""
    for entry in entries.values():
        for e in entry if isinstance(entry, list) else [entry]:
            if hasattr(e, "data"):
                e.data = None


def fill_entry(entry, tensor, name: str) -> None:
    """Give a meta sharded-state-dict entry (ShardedTensor or SwiGLU factory) real data, as the main replica."""
    expected = entry_shape(entry)
    if tuple(tensor.shape) != expected:
        raise UserError(f"{name}: converted tensor has shape {list(tensor.shape)}, the model expects "
                        f"{list(expected)}")
    entry.data = tensor
    entry.replica_id = 0


def entry_shape(entry) -> tuple[int, ...]:
    """Local shape of a ShardedTensor, or of the tensor behind a factory (SwiGLU fc1)."""
    shape = getattr(entry, "local_shape", None)
    return tuple(shape if shape is not None else entry.data.shape)


# --------------------------------------------------------------- mcore -> hf
@dataclass
class ExportJob:
    ckpt_dir: str
    out: str
    meta_json: str
    dtype: str
    overwrite: bool
    progress: bool = True
    round_bytes: int = ROUND_BYTES


def mcore_to_hf(load: str | Path, out: str | Path, *, dtype: str | None = None, workers: int = 1,
                ckpt_step: int | None = None, overwrite: bool = False, progress: bool = True,
                round_bytes: int | None = None) -> Path:
    """Export a Megatron checkpoint written by this project to a HF directory transformers loads offline."""
    out = check_output(out, overwrite)
    ckpt_dir = resolve_checkpoint(load, ckpt_step)
    meta = read_meta(ckpt_dir)
    if trainable.is_trainable_only(meta):
        trainable.resolve_base(ckpt_dir, meta)  # refuse a missing or mismatched base before starting workers
    dtype = canonical_dtype(dtype or meta.dtype)
    job = ExportJob(str(ckpt_dir), str(out), meta.to_json(), dtype, overwrite, progress,
                    ROUND_BYTES if round_bytes is None else round_bytes)
    sizes = unit_sizes(meta.arch, meta.padded_vocab_size, dtype_bytes(meta.dtype), meta.arch.num_layers)
    from llamapro_megatron.runtime.launch import inside_launcher

    if direct.enabled() and not inside_launcher() and not trainable.is_trainable_only(meta):
        tensors = direct.plan_export(ckpt_dir, meta.arch, meta.dtype, dtype)
        if isinstance(tensors, list):
            _mcore_to_hf_direct(job, meta.arch, list(sizes), tensors, workers)
            return out
    run_job(_export_worker, job, workers, out, sum(sizes.values()))
    return out


def _export_worker(job: ExportJob) -> None:
    import torch
    import torch.distributed as dist

    from llamapro_megatron.runtime.distributed import destroy_distributed, init_distributed

    info = init_distributed(tp=1, pp=1)  # prepares megatron-core: import it only after this
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensorFactory

    meta = CheckpointMeta.from_json(job.meta_json)
    arch = meta.arch
    out = Path(job.out)
    tmp = partial_dir(out)
    if info.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()

    model = build_gpt_model(arch, meta.padded_vocab_size, dtype=meta.dtype, meta_device=True)
    sharded = model.sharded_state_dict()
    ckpt_dtype = getattr(torch, meta.dtype)
    sizes = unit_sizes(arch, meta.padded_vocab_size, ckpt_dtype.itemsize, arch.num_layers)
    units = list(sizes)
    owner = assign_units(units, sizes, info.world_size)
    out_dtype = getattr(torch, job.dtype)
    total_files = len(units)
    bar = SharedProgress(tmp / ".progress", info.rank, info.world_size, total=sum(sizes.values()),
                         desc="mcore-to-hf", enabled=job.progress)
    entries = entries_by_unit(sharded)
    # Rounds bound a worker's memory; load is collective, so every rank takes part in every round (with an
    # empty request when it has nothing left).
    for units_now in worker_rounds(owner, sizes, info.rank, info.world_size, job.round_bytes):
        request = {}
        for unit in units_now:
            for name, entry in entries.get(unit, []):
                if isinstance(entry, ShardedTensorFactory):
                    # SwiGLU fc1: read megatron-core's two stored halves ([gate; up]) as they are, instead of
                    # letting the factory concatenate them only for the export to split them again
                    halves = entry.build()
                    for half in halves:
                        half.data = torch.empty(half.local_shape, dtype=ckpt_dtype)
                        half.replica_id = 0
                    request[name] = halves
                elif not isinstance(entry, ShardedObject):
                    entry.data = torch.empty(entry_shape(entry), dtype=ckpt_dtype)
                    entry.replica_id = 0  # this worker is the one reader of the unit
                    request[name] = entry
        # A round reads part of each stacked tensor by design, so megatron's full-coverage check does not apply.
        loaded = trainable.load({"model": request}, job.ckpt_dir, meta)
        loaded = loaded.get("model", {})  # absent when this rank asked for nothing this round
        release(request)
        for unit in units_now:
            tensors = {}
            for name, _ in entries.get(unit, []):
                if name in loaded:
                    _, tmap = mapping.lookup(name)
                    for hf_name, t in zip(mapping.hf_names(name), mapping.to_hf(tmap, loaded.pop(name), arch)):
                        tensors[hf_name] = t.to(out_dtype)
            hfio.write_shard(tmp / hfio.shard_name(units.index(unit), total_files), tensors)
            bar.update(sizes[unit])
        del loaded
    dist.barrier()
    bar.close()
    if info.rank == 0:
        finish_export(tmp, out, arch, units, job.dtype, Path(job.ckpt_dir), job.progress)
    dist.barrier()
    destroy_distributed()


def finish_export(tmp: Path, out: Path, arch: LlamaArch, units: list[str], dtype: str, ckpt_dir: Path,
                  progress: bool) -> None:
    """Once every shard (one per unit) is in `tmp`: the index, configs and tokenizer files; then rename to `out`."""
    shapes = mapping.expected_hf_shapes(arch)
    weight_map = {name: hfio.shard_name(units.index(_hf_unit(name)), len(units)) for name in shapes}
    total = hfio.write_index(tmp, weight_map, shapes, dtype_bytes(dtype))
    config = arch.to_hf_config(dtype)
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (tmp / "generation_config.json").write_text(json.dumps(hfio.generation_config(config), indent=2) + "\n")
    hfio.copy_tokenizer_files(ckpt_dir / TOKENIZER_DIR, tmp)
    shutil.rmtree(tmp / ".progress", ignore_errors=True)
    commit_output(tmp, out)
    if progress:
        print(f"mcore-to-hf: wrote {out} ({len(units)} shards, {total / 1e9:.2f} GB)", flush=True)


def _mcore_to_hf_direct(job: ExportJob, arch: LlamaArch, units: list[str], tensors: list[direct.HFTensor],
                        workers: int) -> None:
    """mcore-to-hf through `direct`: `workers` threads copy each shard's tensors from the checkpoint's files."""
    from concurrent.futures import ThreadPoolExecutor

    require_workers(workers)
    out = Path(job.out)
    tmp = partial_dir(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shards: dict[str, list[direct.HFTensor]] = {u: [] for u in units}
    for t in tensors:
        shards[_hf_unit(t.name)].append(t)
    sizes = {u: sum(t.nbytes for t in mine) for u, mine in shards.items()}
    owner = assign_units(units, sizes, max(1, min(workers, len(units))))
    stop = threading.Event()
    bar = _ThreadedBar(sum(sizes.values()), "mcore-to-hf", job.progress)

    def write(w: int) -> None:
        for u in units:
            if owner[u] == w:
                direct.write_hf_shard(tmp / hfio.shard_name(units.index(u), len(units)), shards[u], job.dtype,
                                      bar.update, stop)

    threads = max(owner.values()) + 1
    with _output_or_nothing(tmp, out, bar), ThreadPoolExecutor(threads) as pool:
        copies = [pool.submit(write, w) for w in range(threads)]
        try:
            for copy in copies:
                copy.result()
        except BaseException:
            stop.set()
            raise
    finish_export(tmp, out, arch, units, job.dtype, Path(job.ckpt_dir), job.progress)


def _hf_unit(hf_name: str) -> str:
    if hf_name.startswith(mapping.HF_LAYER_PREFIX):
        return f"layer{int(hf_name.split('.')[2])}"
    return EMBED_UNIT if hf_name == "model.embed_tokens.weight" else HEAD_UNIT
