"""HF <-> Megatron conversion: streaming, parallel, exact. The entry points, and the choice of path.

A torch_dist checkpoint stores global tensors in chunks, so any number of workers can each write (or read) a share of
them: the work is cut into units (`units.py`), each worker reads only its units' tensors, and `--tp/--pp` validate
and are recorded only (the checkpoint loads at any layout). Output is assembled in `OUT.partial` and renamed to OUT
at the very end (`output.py`). This process validates and plans; it never imports torch.

Two paths write the same checkpoint (tested tensor by tensor and byte for byte):
- *direct* (`direct_import.py`, `direct_export.py`), when no dtype changes and outside torchrun: tensor bytes are
  copied file to file by threads; hf-to-mcore starts one process, which confirms the layout with megatron-core and
  writes the checkpoint's metadata; mcore-to-hf starts none.
- *regular* (`regular_import.py`, `regular_export.py`): worker processes build the tensors and megatron-core's
  dist_checkpointing writes / reads them. For dtype changes, torchrun launches, checkpoints the direct reader does
  not handle, a direct plan megatron-core or torch does not confirm (a one-line notice), and
  `LLAMAPRO_DIRECT_CONVERT=0`.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from llamapro_megatron.arch import LlamaArch, canonical_dtype, dtype_bytes
from llamapro_megatron.checkpoint import direct_export, direct_import, mapping, output, trainable, units
from llamapro_megatron.checkpoint import hf as hfio
from llamapro_megatron.checkpoint.load import check_files
from llamapro_megatron.checkpoint.mcore import CheckpointMeta, read_meta, recorded_layout, resolve_checkpoint
from llamapro_megatron.errors import UserError
from llamapro_megatron.expansion import ExpansionPlan, compose

DIRECT_SWITCH = "LLAMAPRO_DIRECT_CONVERT"  # "0": always the regular path


def direct_path_allowed() -> bool:
    from llamapro_megatron.runtime.launch import inside_launcher

    return os.environ.get(DIRECT_SWITCH, "1") != "0" and not inside_launcher()


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
    round_bytes: int = units.ROUND_BYTES


def hf_to_mcore(hf_dir: str | Path, out: str | Path, *, tp: int = 1, pp: int = 1, vpp: int | None = None,
                ep: int = 1, etp: int | None = None, dtype: str | None = None, workers: int = 1,
                overwrite: bool = False, plan: ExpansionPlan | None = None, make_vocab_size_divisible_by: int = 128,
                progress: bool = True, round_bytes: int | None = None) -> Path:
    """Convert a HF LLaMA-family directory into a Megatron-LM style torch_dist checkpoint at `out`.

    With an expansion `plan` the checkpoint is written expanded in the same pass (identity copies).
    """
    hf_dir, out = Path(hf_dir), output.check_output(out, overwrite, inputs=(hf_dir,))
    arch = LlamaArch.from_hf_dir(hf_dir)
    plan = plan or ExpansionPlan.identity(arch.num_layers)
    if plan.source_num_layers != arch.num_layers:
        raise UserError(f"the expansion plan is for {plan.source_num_layers} layers; {hf_dir} has {arch.num_layers}")
    num_layers = plan.num_layers
    arch.validate_layout(tp, pp, vpp, num_layers=num_layers, ep=ep, etp=etp)
    reader = hfio.HFReader(hf_dir)
    hfio.validate_hf_tensors(reader, mapping.expected_hf_shapes(arch))
    dtype = canonical_dtype(dtype or arch.dtype)
    padded = arch.padded_vocab_size(tp, make_vocab_size_divisible_by)
    out_arch = arch.replace(num_layers=num_layers)
    meta = CheckpointMeta(arch=out_arch, padded_vocab_size=padded, dtype=dtype,
                          layout=recorded_layout(tp, pp, vpp, ep, etp),
                          source={"kind": "huggingface", "path": str(hf_dir.resolve())},
                          expansion=compose(None, plan) if plan.new_indices else None)
    job = ImportJob(str(hf_dir), str(out), out_arch.to_dict(), padded, dtype, meta.to_json(), plan, overwrite,
                    progress, units.ROUND_BYTES if round_bytes is None else round_bytes)
    if direct_path_allowed():
        chunks = direct_import.plan_import(reader, arch, plan, padded, dtype)
        if isinstance(chunks, list):
            reason = direct_import.convert(job, chunks, workers)
            if reason is None:
                return out
            print(f"hf-to-mcore: {reason}; converting through megatron-core's writer instead", file=sys.stderr)
    from llamapro_megatron.checkpoint.regular_import import import_worker

    total = sum(units.unit_sizes(out_arch, padded, dtype_bytes(dtype), num_layers).values())
    output.run_job(import_worker, job, workers, out, total)
    return out


# --------------------------------------------------------------- mcore -> hf
@dataclass
class ExportJob:
    ckpt_dir: str
    out: str
    meta_json: str
    dtype: str
    overwrite: bool
    progress: bool = True
    round_bytes: int = units.ROUND_BYTES


def mcore_to_hf(load: str | Path, out: str | Path, *, dtype: str | None = None, workers: int = 1,
                ckpt_step: int | None = None, overwrite: bool = False, progress: bool = True,
                round_bytes: int | None = None) -> Path:
    """Export a Megatron checkpoint written by this project to a HF directory transformers loads offline."""
    out = output.check_output(out, overwrite, inputs=(load,))
    ckpt_dir = resolve_checkpoint(load, ckpt_step)
    meta = read_meta(ckpt_dir)
    check_files(ckpt_dir)  # a missing or truncated file is named here, on either path
    if trainable.is_trainable_only(meta):
        check_files(trainable.resolve_base(ckpt_dir, meta))  # refuse a missing or mismatched base before workers
    dtype = canonical_dtype(dtype or meta.dtype)
    job = ExportJob(str(ckpt_dir), str(out), meta.to_json(), dtype, overwrite, progress,
                    units.ROUND_BYTES if round_bytes is None else round_bytes)
    if direct_path_allowed() and not trainable.is_trainable_only(meta):
        tensors = direct_export.plan_export(ckpt_dir, meta.arch, meta.padded_vocab_size, meta.dtype, dtype)
        if isinstance(tensors, list):
            direct_export.export(job, meta.arch, tensors, workers)
            return out
    from llamapro_megatron.checkpoint.regular_export import export_worker

    sizes = units.unit_sizes(meta.arch, meta.padded_vocab_size, dtype_bytes(meta.dtype), meta.arch.num_layers)
    output.run_job(export_worker, job, workers, out, sum(sizes.values()))
    return out
