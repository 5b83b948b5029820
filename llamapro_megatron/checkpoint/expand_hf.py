"""`llamapro expand-hf`: the same block expansion, Hugging Face directory to Hugging Face directory.

Workers each write the safetensors shards of their expanded units (one shard per unit), reading only the source
tensors they need. Without a dtype change a worker copies the tensors' byte ranges file to file (`st_copy`) and
never imports torch; with one, it reads, converts and saves tensors. The new blocks' tensors are their source
layer's, with those the description marks `zero_in_identity_copy` (o_proj, down_proj) zeroed.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from llamapro_megatron.arch import LlamaArch, canonical_dtype, dtype_bytes
from llamapro_megatron.checkpoint import hf as hfio
from llamapro_megatron.checkpoint import mapping, output, st_copy, units
from llamapro_megatron.expansion import ExpansionPlan, describe
from llamapro_megatron.progress import SharedProgress


@dataclass
class ExpandHFJob:
    hf_dir: str
    tmp: str
    arch: dict
    plan: ExpansionPlan
    dtype: str
    owner: dict[str, int]  # unit -> worker
    world_size: int
    copy_bytes: bool  # no dtype change: byte copies, no torch
    progress: bool


def expand_hf(hf_dir: str | Path, out: str | Path, plan_fn, *, dtype: str | None = None, workers: int = 1,
              overwrite: bool = False, progress: bool = True) -> Path:
    """The same expansion, Hugging Face directory to Hugging Face directory, streaming by layer."""
    from llamapro_megatron.runtime.launch import WorkerError, run_workers

    hf_dir, out = Path(hf_dir), output.check_output(out, overwrite, inputs=(hf_dir,))
    arch = LlamaArch.from_hf_dir(hf_dir)
    reader = hfio.HFReader(hf_dir)
    hfio.validate_hf_tensors(reader, mapping.expected_hf_shapes(arch))
    plan = plan_fn(arch.num_layers)
    if progress:
        print(describe(plan), flush=True)
    output.require_workers(workers)
    out_dtype = canonical_dtype(dtype or arch.dtype)
    unit_names = units.unit_names(plan.num_layers)
    sizes = units.unit_sizes(arch, arch.vocab_size, dtype_bytes(out_dtype), plan.num_layers)
    copy_bytes = all(reader.dtype(src) == out_dtype for u in unit_names for _, src, _ in unit_tensors(u, arch, plan))
    tmp = output.start_output(out)
    job = ExpandHFJob(str(hf_dir), str(tmp), arch.to_dict(), plan, out_dtype,
                      units.assign_units(unit_names, sizes, workers), workers, copy_bytes, progress)
    with output.removed_on_failure(tmp, out):
        if workers == 1:
            weight_maps = [expand_hf_worker(job)]
        else:
            try:
                weight_maps = run_workers(expand_hf_worker, workers, args=(job,), frameworks=not copy_bytes,
                                          env={"CUDA_VISIBLE_DEVICES": ""})
            except WorkerError as e:
                raise output.failed(out, output.last_line(e)) from e
        weight_map = {k: v for m in weight_maps for k, v in m.items()}
        hfio.write_index(tmp, weight_map, mapping.expected_hf_shapes(arch, plan.num_layers), dtype_bytes(out_dtype))
        config = arch.replace(num_layers=plan.num_layers).to_hf_config(out_dtype)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        gen = hf_dir / "generation_config.json"
        if gen.is_file():
            shutil.copy2(gen, tmp / gen.name)
        else:
            (tmp / gen.name).write_text(json.dumps(hfio.generation_config(config), indent=2) + "\n")
        hfio.copy_tokenizer_files(hf_dir, tmp)
    output.commit_output(tmp, out)
    if progress:
        print(f"expand-hf: wrote {out} ({plan.source_num_layers} -> {plan.num_layers} layers)", flush=True)
    return out


def unit_tensors(unit: str, arch: LlamaArch, plan: ExpansionPlan) -> list[tuple[str, str, bool]]:
    """(output name, source name, zeroed) of every HF tensor of an expanded-model unit."""
    if unit in (units.EMBED_UNIT, units.HEAD_UNIT):
        return [(n, n, False) for n in mapping.hf_global_shapes(arch) if units.hf_unit_of(n) == unit]
    layer = int(unit.removeprefix("layer"))
    src = plan.sources[layer]
    return [(mapping.hf_name(rel, layer), mapping.hf_name(rel, src), plan.is_new(layer) and t.zero_in_identity_copy)
            for t in mapping.layer_tensors(arch) for rel in t.hf_names()]


def expand_hf_worker(job: ExpandHFJob) -> dict[str, str]:
    """Write this worker's shards; returns their weight map."""
    from llamapro_megatron.runtime.launch import current_rank

    rank = current_rank() if job.world_size > 1 else 0
    arch = LlamaArch.from_dict(job.arch)
    reader = hfio.HFReader(job.hf_dir)
    tmp = Path(job.tmp)
    unit_names = units.unit_names(job.plan.num_layers)
    sizes = units.unit_sizes(arch, arch.vocab_size, dtype_bytes(job.dtype), job.plan.num_layers)
    bar = SharedProgress(tmp / output.PROGRESS_DIR, rank, job.world_size, total=sum(sizes.values()),
                         desc="expand-hf", enabled=job.progress)
    headers: dict = {}
    weight_map = {}
    for unit in unit_names:
        if job.owner[unit] != rank:
            continue
        name = hfio.shard_name(unit_names.index(unit), len(unit_names))
        tensors = unit_tensors(unit, arch, job.plan)
        if job.copy_bytes:
            st_copy.write_shard(tmp / name, [st_copy.TensorCopy(out_name, str(reader.dir / reader.weight_map[src]),
                                                                src, zero) for out_name, src, zero in tensors],
                                {"format": "pt"}, headers)
        else:
            import torch

            out_dtype = getattr(torch, job.dtype)
            hfio.write_shard(tmp / name, {out_name: torch.zeros(reader.shape(src), dtype=out_dtype) if zero
                                          else reader.get(src).to(out_dtype) for out_name, src, zero in tensors})
        weight_map.update({out_name: name for out_name, _, _ in tensors})
        bar.update(sizes[unit])
    bar.close()
    return weight_map
