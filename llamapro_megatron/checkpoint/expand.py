"""Block expansion of a checkpoint without gathering the model.

Megatron -> Megatron: workers (a gloo world at TP=1 PP=1, as in conversion) each own some *source* units
(a source decoder layer with all the expanded layers read from it; the embedding; final norm + output layer).
A worker reads each of its source layers once through megatron-core's loader — one load cannot read the same
slice twice — and clones it into its copies, zeroing the copies' `linear_proj` / `linear_fc2`; the world then
saves the expanded checkpoint together. Any source layout in, any layout out (torch_dist reshards on load).

HF -> HF (`expand-hf`): processes each write the safetensors shards of their expanded layers, reading only the
source tensors they need. Without a dtype change a worker copies the tensors' byte ranges file to file
(`st_copy`) and never imports torch; with one, it reads, converts and saves tensors.
"""
from __future__ import annotations

import json
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

from llamapro_megatron.arch import LlamaArch, canonical_dtype, dtype_bytes
from llamapro_megatron.checkpoint import hf as hfio
from llamapro_megatron.checkpoint import mapping, st_copy, trainable
from llamapro_megatron.checkpoint.convert import (
    EMBED_UNIT,
    HEAD_UNIT,
    ROUND_BYTES,
    assign_units,
    entries_by_unit,
    entry_shape,
    fill_entry,
    finish_release_output,
    release,
    release_common,
    require_workers,
    run_job,
    start_release_output,
    unit_of,
    unit_sizes,
    worker_rounds,
)
from llamapro_megatron.checkpoint.mcore import (
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
from llamapro_megatron.checkpoint.rounds import save_in_rounds
from llamapro_megatron.errors import UserError
from llamapro_megatron.expansion import ExpansionPlan, compose, describe
from llamapro_megatron.progress import SharedProgress


def _source_unit_sizes(arch: LlamaArch, padded_vocab: int, itemsize: int, plan: ExpansionPlan) -> dict[str, int]:
    """Work per source unit: a source layer weighs as many layers as are written from it."""
    sizes = unit_sizes(arch, padded_vocab, itemsize, plan.source_num_layers)
    for s in range(plan.source_num_layers):
        sizes[f"layer{s}"] *= len(plan.copies_of(s))
    return sizes


# ------------------------------------------------------------ megatron -> megatron
@dataclass
class ExpandJob:
    src_dir: str
    out: str
    src_meta_json: str
    meta_json: str
    plan: ExpansionPlan
    progress: bool = True
    round_bytes: int = ROUND_BYTES
    desc: str = "expand"
    base: str | None = None  # where a trainable-only source's base is, when not where its metadata says


def expand_mcore(load: str | Path, out: str | Path, plan_fn, *, tp: int = 1, pp: int = 1, vpp: int | None = None,
                 dtype: str | None = None, workers: int = 1, ckpt_step: int | None = None, overwrite: bool = False,
                 progress: bool = True, round_bytes: int | None = None) -> Path:
    """Expand a Megatron checkpoint. `plan_fn(num_source_layers) -> ExpansionPlan` (the CLI's plan flags)."""
    out = check_output(out, overwrite)
    src_dir = resolve_checkpoint(load, ckpt_step)
    src = read_meta(src_dir)
    if trainable.is_trainable_only(src):
        trainable.resolve_base(src_dir, src)  # refuse a missing or mismatched base before starting workers
    plan = plan_fn(src.arch.num_layers)
    src.arch.validate_layout(tp, pp, vpp, num_layers=plan.num_layers)
    if src.padded_vocab_size % tp:
        raise UserError(f"--tp {tp} does not divide the checkpoint's padded vocabulary {src.padded_vocab_size}; "
                        "re-convert with --tp set to the layout you will train at")
    if progress:
        print(describe(plan, pp, vpp), flush=True)
    meta = CheckpointMeta(arch=src.arch.replace(num_layers=plan.num_layers), padded_vocab_size=src.padded_vocab_size,
                          dtype=canonical_dtype(dtype or src.dtype), layout={"tp": tp, "pp": pp, "vpp": vpp},
                          source={"kind": "megatron", "path": str(src_dir.resolve()), "source": src.source},
                          expansion=compose(src.expansion, plan))
    job = ExpandJob(str(src_dir), str(out), src.to_json(), meta.to_json(), plan, progress,
                    ROUND_BYTES if round_bytes is None else round_bytes)
    run_job(_expand_worker, job, workers, out,
            sum(_source_unit_sizes(src.arch, src.padded_vocab_size, dtype_bytes(src.dtype), plan).values()))
    return out


def _expand_worker(job: ExpandJob) -> None:
    import torch

    out = Path(job.out)
    info, tmp = start_release_output(out)  # prepares megatron-core: import it only after this
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    src, dst, plan = CheckpointMeta.from_json(job.src_meta_json), CheckpointMeta.from_json(job.meta_json), job.plan
    src_dtype, dst_dtype = getattr(torch, src.dtype), getattr(torch, dst.dtype)
    sizes = _source_unit_sizes(src.arch, src.padded_vocab_size, src_dtype.itemsize, plan)
    owner = assign_units(list(sizes), sizes, info.world_size)
    # the bar counts each byte twice: once read and cloned, once written
    bar = SharedProgress(tmp / ".progress", info.rank, info.world_size, total=2 * sum(sizes.values()),
                         desc=job.desc, enabled=job.progress)
    src_entries = entries_by_unit(
        build_gpt_model(src.arch, src.padded_vocab_size, dtype=src.dtype, meta_device=True).sharded_state_dict())
    # expanded-model entries grouped by the *source* unit they are written from
    dst_entries: dict[str, list] = {}
    dst_sd = build_gpt_model(dst.arch, dst.padded_vocab_size, dtype=dst.dtype, meta_device=True).sharded_state_dict()
    for name, entry in dst_sd.items():
        layer, rel = mapping.split_layer_name(name)
        src_name = name if layer is None else f"decoder.layers.{plan.sources[layer]}.{rel}"
        dst_entries.setdefault(unit_of(src_name), []).append((name, src_name, layer, entry))

    def rounds():
        for units in worker_rounds(owner, sizes, info.rank, info.world_size, job.round_bytes):
            # 1. read each source unit of this round once (collective, like the save)
            request = {}
            for unit in units:
                for name, entry in src_entries.get(unit, []):
                    if not isinstance(entry, ShardedObject):
                        entry.data = torch.empty(entry_shape(entry), dtype=src_dtype)
                        entry.replica_id = 0
                        request[name] = entry
            loaded = trainable.load({"model": request}, job.src_dir, src, base=job.base).get("model", {})
            release(request)
            # 2. fill the expanded layers written from them: the original, then its identity copies
            owned = {}
            for unit in units:
                for name, src_name, layer, entry in dst_entries.get(unit, []):
                    entry.replica_id = 0
                    if not isinstance(entry, ShardedObject):
                        tensor = loaded[src_name]
                        if layer is not None and plan.is_new(layer):
                            zero = mapping.lookup(name)[1].zero_in_identity_copy
                            tensor = torch.zeros_like(tensor) if zero else tensor.clone()  # a copy owns its storage
                        fill_entry(entry, tensor.to(dst_dtype), name)
                        bar.update(tensor.numel() * src_dtype.itemsize)
                    owned[name] = entry
            del loaded
            yield owned
            bar.update(sum(sizes[u] for u in units))
            release(owned)

    common = release_common(job.meta_json)
    save_in_rounds(rounds(), tmp / RELEASE, common)
    bar.close()  # after the collective save: every rank's bytes are in
    finish_release_output(info, tmp, out, job.meta_json, Path(job.src_dir) / TOKENIZER_DIR)
    if info.rank == 0 and job.progress:
        print(f"{job.desc}: wrote {out} ({plan.source_num_layers} -> {plan.num_layers} layers)", flush=True)


# ------------------------------------------------------------------ hf -> hf
def expand_hf(hf_dir: str | Path, out: str | Path, plan_fn, *, dtype: str | None = None, workers: int = 1,
              overwrite: bool = False, progress: bool = True) -> Path:
    """The same expansion, Hugging Face directory to Hugging Face directory, streaming by layer."""
    hf_dir, out = Path(hf_dir), check_output(out, overwrite)
    arch = LlamaArch.from_hf_dir(hf_dir)
    reader = hfio.HFReader(hf_dir)
    hfio.validate_hf_tensors(reader, mapping.expected_hf_shapes(arch))
    plan = plan_fn(arch.num_layers)
    if progress:
        print(describe(plan), flush=True)
    require_workers(workers)
    out_dtype = canonical_dtype(dtype or arch.dtype)
    units = [EMBED_UNIT, HEAD_UNIT] + [f"layer{i}" for i in range(plan.num_layers)]
    itemsize = dtype_bytes(out_dtype)
    sizes = unit_sizes(arch, arch.vocab_size, itemsize, plan.num_layers)
    owner = assign_units(units, sizes, workers)
    tmp = partial_dir(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {u: _unit_tensors(u, arch, plan) for u in units}
    if all(reader.dtype(src) == out_dtype for ts in tensors.values() for _, src, _ in ts):
        # no dtype changes: copy byte ranges file to file in workers that never import torch
        worker = st_copy.write_shards
        jobs = [([(hfio.shard_name(i, len(units)),
                   [st_copy.TensorCopy(name, str(hf_dir / reader.weight_map[src]), src, zero)
                    for name, src, zero in tensors[u]], sizes[u])
                  for i, u in enumerate(units) if owner[u] == w],
                 str(tmp), w, workers, sum(sizes.values()), progress, "expand-hf") for w in range(workers)]
    else:
        worker = _expand_hf_worker
        jobs = [(str(hf_dir), str(tmp), arch.to_dict(), plan, out_dtype, [u for u in units if owner[u] == w], units,
                 w, workers, progress) for w in range(workers)]
    try:
        if workers == 1:
            weight_maps = [worker(*jobs[0])]
        else:
            with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
                weight_maps = list(pool.map(worker, *zip(*jobs)))
        weight_map = {k: v for m in weight_maps for k, v in m.items()}
        hfio.write_index(tmp, weight_map, mapping.expected_hf_shapes(arch, plan.num_layers), itemsize)
        out_arch = arch.replace(num_layers=plan.num_layers)
        config = out_arch.to_hf_config(out_dtype)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        gen = hf_dir / "generation_config.json"
        if gen.is_file():
            shutil.copy2(gen, tmp / gen.name)
        else:
            (tmp / gen.name).write_text(json.dumps(hfio.generation_config(config), indent=2) + "\n")
        hfio.copy_tokenizer_files(hf_dir, tmp)
        shutil.rmtree(tmp / ".progress", ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    commit_output(tmp, out)
    if progress:
        print(f"expand-hf: wrote {out} ({plan.source_num_layers} -> {plan.num_layers} layers)", flush=True)
    return out


def _unit_tensors(unit: str, arch: LlamaArch, plan: ExpansionPlan) -> list[tuple[str, str, bool]]:
    """(output name, source name, zeroed) of every HF tensor of an expanded-model unit."""
    if unit == EMBED_UNIT:
        return [("model.embed_tokens.weight", "model.embed_tokens.weight", False)]
    if unit == HEAD_UNIT:
        head = [("model.norm.weight", "model.norm.weight", False)]
        return head if arch.tie_word_embeddings else [*head, ("lm_head.weight", "lm_head.weight", False)]
    layer = int(unit.removeprefix("layer"))
    src = plan.sources[layer]
    return [(f"{mapping.HF_LAYER_PREFIX}{layer}.{rel}", f"{mapping.HF_LAYER_PREFIX}{src}.{rel}",
             plan.is_new(layer) and t.zero_in_identity_copy)
            for t in mapping.LAYER_TENSORS for rel in t.hf]


def _expand_hf_worker(hf_dir: str, tmp: str, arch_dict: dict, plan: ExpansionPlan, dtype: str, my_units: list[str],
                      units: list[str], rank: int, world: int, progress: bool) -> dict[str, str]:
    """A worker for expansions that change the dtype (the others copy bytes: `st_copy.write_shards`)."""
    import torch

    arch = LlamaArch.from_dict(arch_dict)
    reader = hfio.HFReader(hf_dir)
    out_dtype = getattr(torch, dtype)
    itemsize = out_dtype.itemsize
    sizes = unit_sizes(arch, arch.vocab_size, itemsize, plan.num_layers)
    bar = SharedProgress(Path(tmp) / ".progress", rank, world, total=sum(sizes.values()), desc="expand-hf",
                         enabled=progress)
    weight_map = {}
    for unit in my_units:
        tensors = {}
        for name, src, zero in _unit_tensors(unit, arch, plan):
            tensors[name] = torch.zeros(reader.shape(src), dtype=out_dtype) if zero else reader.get(src).to(out_dtype)
        name = hfio.shard_name(units.index(unit), len(units))
        hfio.write_shard(Path(tmp) / name, tensors)
        weight_map.update({k: name for k in tensors})
        bar.update(sizes[unit])
    bar.close()
    return weight_map
