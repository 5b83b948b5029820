"""`llamapro merge`: a trainable-only training save + its base -> one full Megatron checkpoint.

Streaming, like `expand`: workers each own some layers (and the embedding / output units), read them in rounds
through `load.load` (trained tensors from the save, frozen ones from the base) and the world saves them
together; no process holds the whole model. It is `expand`'s worker with the identity plan and the save's own
metadata. The output is a `release` checkpoint of the weights (architecture, expansion and iteration recorded):
export, expand, verify and `train` (a fresh run) take it like any other. To *resume* the run with its optimizer,
pass the trainable-only save itself to `train --load`.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from llamapro_megatron.checkpoint import trainable
from llamapro_megatron.checkpoint.expand import ExpandJob, run_expand_job
from llamapro_megatron.checkpoint.mcore import read_meta, recorded_layout, resolve_checkpoint
from llamapro_megatron.checkpoint.output import check_not_input, check_output
from llamapro_megatron.checkpoint.units import ROUND_BYTES
from llamapro_megatron.errors import UserError
from llamapro_megatron.expansion import ExpansionPlan


def merge_trainable(base: str | Path | None, save: str | Path, out: str | Path, *, ckpt_step: int | None = None,
                    tp: int | None = None, pp: int | None = None, vpp: int | None = None, ep: int | None = None,
                    etp: int | None = None, workers: int = 1,
                    overwrite: bool = False, progress: bool = True, round_bytes: int | None = None) -> Path:
    """Write the full checkpoint of a trainable-only save at `out`; `base`: its base, if moved (else recorded).
    `tp`..`etp`: the layout to validate and record (each None: the save's)."""
    out = check_output(out, overwrite, inputs=(save,))
    save_dir = resolve_checkpoint(save, ckpt_step, flag="--trainable")
    meta = read_meta(save_dir)
    if not trainable.is_trainable_only(meta):
        raise UserError(f"--trainable {save_dir} is a full checkpoint already (its llamapro.json has no "
                        "trainable_only record): nothing to merge; use it as it is")
    base_dir = trainable.resolve_base(save_dir, meta, base)
    check_not_input(out, (base_dir,))  # the base, as given or as the save records it

    def given(value, name, default):
        return value if value is not None else meta.layout.get(name, default)

    layout = recorded_layout(given(tp, "tp", 1), given(pp, "pp", 1), given(vpp, "vpp", None), given(ep, "ep", 1),
                             given(etp, "etp", None))
    meta.arch.validate_layout(layout["tp"], layout["pp"], layout["vpp"], ep=layout.get("ep", 1),
                              etp=layout.get("etp"))
    if meta.padded_vocab_size % layout["tp"]:
        raise UserError(f"--tp {layout['tp']} does not divide the checkpoint's padded vocabulary "
                        f"{meta.padded_vocab_size}")
    merged = dataclasses.replace(meta, trainable_only=None, layout=layout,
                                 source={"kind": "merged", "base": str(base_dir), "trainable": str(save_dir.resolve()),
                                         "source": meta.source})
    n = meta.arch.num_layers
    job = ExpandJob(str(save_dir), str(out), meta.to_json(), merged.to_json(), ExpansionPlan.identity(n), progress,
                    ROUND_BYTES if round_bytes is None else round_bytes, desc="merge", base=str(base_dir))
    run_expand_job(job, workers)
    return out
