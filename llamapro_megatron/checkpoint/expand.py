"""Block expansion of a Megatron checkpoint without gathering the model (`llamapro expand`; `merge` reuses it).

Workers (a gloo world at TP=1 PP=1, as in conversion) each own some *source* units (a source decoder layer with all
the expanded layers read from it; the embedding; final norm + output layer). A worker reads each of its source
layers once through the checkpoint reader (`load.py`) — one load cannot read the same slice twice — and clones it
into its copies, zeroing the tensors the description marks `zero_in_identity_copy` (`linear_proj`, `linear_fc2`);
the world then saves the expanded checkpoint together, in rounds (`save.py`). Any source layout in, any layout out
(torch_dist reshards on load).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from llamapro_megatron.arch import canonical_dtype, dtype_bytes
from llamapro_megatron.checkpoint import mapping, output, trainable, units
from llamapro_megatron.checkpoint.mcore import (
    TOKENIZER_DIR,
    CheckpointMeta,
    read_meta,
    recorded_layout,
    resolve_checkpoint,
)
from llamapro_megatron.errors import UserError
from llamapro_megatron.expansion import ExpansionPlan, compose, describe
from llamapro_megatron.progress import SharedProgress


@dataclass
class ExpandJob:
    src_dir: str
    out: str
    src_meta_json: str
    meta_json: str
    plan: ExpansionPlan
    progress: bool = True
    round_bytes: int = units.ROUND_BYTES
    desc: str = "expand"
    base: str | None = None  # where a trainable-only source's base is, when not where its metadata says


def expand_mcore(load: str | Path, out: str | Path, plan_fn, *, tp: int = 1, pp: int = 1, vpp: int | None = None,
                 ep: int = 1, etp: int | None = None, dtype: str | None = None, workers: int = 1,
                 ckpt_step: int | None = None, overwrite: bool = False, progress: bool = True,
                 round_bytes: int | None = None) -> Path:
    """Expand a Megatron checkpoint. `plan_fn(num_source_layers) -> ExpansionPlan` (the CLI's plan flags)."""
    out = output.check_output(out, overwrite, inputs=(load,))
    src_dir = resolve_checkpoint(load, ckpt_step)
    src = read_meta(src_dir)
    if trainable.is_trainable_only(src):
        trainable.resolve_base(src_dir, src)  # refuse a missing or mismatched base before starting workers
    plan = plan_fn(src.arch.num_layers)
    src.arch.validate_layout(tp, pp, vpp, num_layers=plan.num_layers, ep=ep, etp=etp)
    if src.padded_vocab_size % tp:
        raise UserError(f"--tp {tp} does not divide the checkpoint's padded vocabulary {src.padded_vocab_size}; "
                        "re-convert with --tp set to the layout you will train at")
    if progress:
        print(describe(plan, pp, vpp), flush=True)
    meta = CheckpointMeta(arch=src.arch.replace(num_layers=plan.num_layers), padded_vocab_size=src.padded_vocab_size,
                          dtype=canonical_dtype(dtype or src.dtype), layout=recorded_layout(tp, pp, vpp, ep, etp),
                          source={"kind": "megatron", "path": str(src_dir.resolve()), "source": src.source},
                          expansion=compose(src.expansion, plan))
    job = ExpandJob(str(src_dir), str(out), src.to_json(), meta.to_json(), plan, progress,
                    units.ROUND_BYTES if round_bytes is None else round_bytes)
    run_expand_job(job, workers)
    return out


def run_expand_job(job: ExpandJob, workers: int) -> None:
    src = CheckpointMeta.from_json(job.src_meta_json)
    sizes = units.source_unit_sizes(src.arch, src.padded_vocab_size, dtype_bytes(src.dtype), job.plan)
    output.run_job(expand_worker, job, workers, Path(job.out), sum(sizes.values()))


def expand_worker(job: ExpandJob) -> None:
    import torch

    out = Path(job.out)
    info, tmp = output.start_release_world(out)  # prepares megatron-core: import it only after this
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensorFactory

    from llamapro_megatron.checkpoint.load import load
    from llamapro_megatron.checkpoint.save import drop_data, entries_by_unit, fill_entry, load_buffers, save_in_rounds
    from llamapro_megatron.runtime.model import build_gpt_model

    src, dst, plan = CheckpointMeta.from_json(job.src_meta_json), CheckpointMeta.from_json(job.meta_json), job.plan
    src_dtype, dst_dtype = getattr(torch, src.dtype), getattr(torch, dst.dtype)
    sizes = units.source_unit_sizes(src.arch, src.padded_vocab_size, src_dtype.itemsize, plan)
    owner = units.assign_units(list(sizes), sizes, info.world_size)
    # the bar counts each byte twice: once read and cloned, once written
    bar = SharedProgress(tmp / output.PROGRESS_DIR, info.rank, info.world_size, total=2 * sum(sizes.values()),
                         desc=job.desc, enabled=job.progress)
    src_entries = entries_by_unit(
        build_gpt_model(src.arch, src.padded_vocab_size, dtype=src.dtype, meta_device=True).sharded_state_dict())
    desc = mapping.Description(dst.arch, dst.padded_vocab_size)
    # expanded-model entries grouped by the *source* unit they are written from
    dst_entries: dict[str, list] = {}
    dst_sd = build_gpt_model(dst.arch, dst.padded_vocab_size, dtype=dst.dtype, meta_device=True).sharded_state_dict()
    for name, entry in dst_sd.items():
        layer, rel = mapping.split_layer_name(name)
        src_name = name if layer is None else f"{mapping.MCORE_LAYER_PREFIX}{plan.sources[layer]}.{rel}"
        dst_entries.setdefault(units.unit_of(src_name), []).append((name, src_name, layer, entry))

    def rounds():
        for units_now in units.worker_rounds(owner, sizes, info.rank, info.world_size, job.round_bytes):
            # 1. read each source unit of this round once (collective, like the save)
            request = load_buffers([e for unit in units_now for e in src_entries.get(unit, [])], src_dtype)
            loaded = load({"model": request}, job.src_dir, src, base=job.base).get("model", {})
            drop_data(request)
            # 2. fill the expanded layers written from them: the original, then its identity copies
            owned = {}
            for unit in units_now:
                for name, src_name, layer, entry in dst_entries.get(unit, []):
                    entry.replica_id = 0
                    if isinstance(entry, ShardedObject):
                        owned[name] = entry
                        continue
                    value = loaded[src_name]
                    values = value if isinstance(value, list) else [value]
                    factory = isinstance(entry, ShardedTensorFactory)
                    parts = entry.build() if factory else [entry]
                    if len(parts) != len(values):
                        raise RuntimeError(f"{name}: {len(parts)} chunks to write from {len(values)} read")
                    new = layer is not None and plan.is_new(layer)
                    zero = new and desc.lookup(name)[1].zero_in_identity_copy
                    for part, v in zip(parts, values):
                        if new:
                            v = torch.zeros_like(v) if zero else v.clone()  # a copy owns its storage
                        fill_entry(part, v.to(dst_dtype), name)
                        bar.update(v.numel() * src_dtype.itemsize)
                    owned[name] = parts if factory else entry
            del loaded
            yield owned
            bar.update(sum(sizes[u] for u in units_now))
            drop_data(owned)

    save_in_rounds(rounds(), tmp / "release", output.release_common(job.meta_json))
    bar.close()  # after the collective save: every rank's bytes are in
    output.finish_release_world(info, tmp, out, job.meta_json, Path(job.src_dir) / TOKENIZER_DIR)
    if info.rank == 0 and job.progress:
        print(f"{job.desc}: wrote {out} ({plan.source_num_layers} -> {plan.num_layers} layers)", flush=True)
