"""Megatron checkpoints: Megatron-LM's directory layout, the project's metadata, models built from it.

Layout (as Megatron-LM writes it):
    SAVE/latest_checkpointed_iteration.txt      "release" (converted) or the last iteration number
    SAVE/release/ | SAVE/iter_0000500/          a torch_dist checkpoint (megatron-core dist_checkpointing)
        llamapro.json                           architecture, padded vocab, dtype, layout, source, expansion
        tokenizer/                              tokenizer files, when the source had them
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llamapro_megatron import __version__
from llamapro_megatron.arch import LlamaArch
from llamapro_megatron.errors import UserError

META_FILE = "llamapro.json"
LATEST_FILE = "latest_checkpointed_iteration.txt"
TOKENIZER_DIR = "tokenizer"
RELEASE = "release"


@dataclass
class CheckpointMeta:
    arch: LlamaArch
    padded_vocab_size: int
    dtype: str
    layout: dict[str, Any]  # the TP/PP/VPP the checkpoint was validated and written for (it loads at any)
    source: dict[str, Any] = field(default_factory=dict)
    expansion: dict[str, Any] | None = None
    iteration: int = 0
    version: str = __version__
    trainable_only: dict[str, Any] | None = None  # a save of the trainable tensors: base, fingerprint, keys

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["arch"] = self.arch.to_dict()
        return json.dumps({"format": "llamapro-megatron", **d}, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> CheckpointMeta:
        d = json.loads(text)
        d.pop("format", None)
        d["arch"] = LlamaArch.from_dict(d["arch"])
        return cls(**d)


def iteration_dir_name(iteration: int | None) -> str:
    return RELEASE if iteration is None else f"iter_{iteration:07d}"


def resolve_checkpoint(load: str | Path, step: int | None = None, flag: str = "--load") -> Path:
    """The torch_dist directory of a Megatron save directory (latest, or --ckpt-step), or the directory itself;
    `flag`: the option that named it, for error messages."""
    load = Path(load)
    if (load / META_FILE).is_file() and (load / "metadata.json").is_file():
        return load
    if not load.is_dir():
        raise UserError(f"{flag} {load} does not exist")
    if step is not None:
        path = load / iteration_dir_name(step)
        if not path.is_dir():
            have = sorted(p.name for p in load.iterdir() if p.name.startswith("iter_"))
            raise UserError(f"--ckpt-step {step}: {path} does not exist (have: {have or 'none'})")
    else:
        latest = load / LATEST_FILE
        if not latest.is_file():
            raise UserError(f"{flag} {load} is not a Megatron checkpoint directory (no {LATEST_FILE}); convert a "
                            "Hugging Face model with `llamapro convert hf-to-mcore` first")
        tag = latest.read_text().strip()
        path = load / (RELEASE if tag == RELEASE else iteration_dir_name(int(tag)))
    if not (path / META_FILE).is_file():
        raise UserError(f"{path} has no {META_FILE}: not a checkpoint written by llamapro-megatron (or incomplete)")
    return path


def read_meta(ckpt_dir: str | Path) -> CheckpointMeta:
    path = Path(ckpt_dir) / META_FILE
    try:
        return CheckpointMeta.from_json(path.read_text())
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(f"{path} is not valid llamapro-megatron metadata ({e})") from e


# ------------------------------------------------------------------ outputs
def partial_dir(out: Path) -> Path:
    """Where an output is assembled; renamed to `out` only once complete, so nothing half-written looks valid."""
    return out.with_name(out.name + ".partial")


def check_output(out: str | Path, overwrite: bool) -> Path:
    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"output {out} already exists; pass --overwrite to replace it, or choose another path")
    return out


def commit_output(tmp: Path, out: Path) -> None:
    """Replace `out` by the completed `tmp` (old output moved aside first, removed after the rename)."""
    trash = None
    if out.exists():
        trash = out.with_name(out.name + f".old-{os.getpid()}")
        out.rename(trash)
    tmp.rename(out)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


# ------------------------------------------------------------------- models
def build_gpt_model(arch: LlamaArch, padded_vocab_size: int, *, dtype: str, tp: int = 1, pp: int = 1,
                    vpp: int | None = None, num_layers: int | None = None, spec: str = "local",
                    meta_device: bool = False, vp_stage: int | None = None, rope_fusion: bool | None = None,
                    **config_overrides):
    """A megatron-core GPTModel for this rank's pipeline stage (parallel state must be initialised).

    meta_device=True builds it without memory, for its sharded_state_dict only (keys, global shapes).
    rope_fusion (CUDA): True (training) fuses RoPE, TE's kernel on the te spec, a compiled one otherwise
    (:mod:`~llamapro_megatron.runtime.rope`); False: megatron's unfused ops on every spec; None: megatron's defaults
    (TE's kernel on te, no compiling: short inference runs would spend more on compiling than it saves).
    """
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    from llamapro_megatron.runtime.specs import gpt_layer_spec, resolve_spec_kind

    kind = resolve_spec_kind(spec)
    overrides = dict(config_overrides)
    if meta_device:
        overrides.update(use_cpu_initialization=True, perform_initialization=False)
    if kind == "te" and rope_fusion is False:
        overrides.setdefault("apply_rope_fusion", False)
    if not meta_device and torch.cuda.is_available():  # the route is process-wide: set it for every real build
        from llamapro_megatron.runtime.rope import set_rope_fusion

        set_rope_fusion(bool(rope_fusion) and kind != "te")  # TE fuses RoPE itself (apply_rope_fusion)
    config = arch.transformer_config(tp=tp, pp=pp, vpp=vpp, dtype=dtype, num_layers=num_layers,
                                     fused_kernels=kind == "te", **overrides)
    ignore_virtual = vp_stage is None
    kwargs = dict(config=config, transformer_layer_spec=gpt_layer_spec(kind),
                  pre_process=ps.is_pipeline_first_stage(ignore_virtual=ignore_virtual, vp_stage=vp_stage),
                  post_process=ps.is_pipeline_last_stage(ignore_virtual=ignore_virtual, vp_stage=vp_stage),
                  **arch.gpt_model_kwargs(padded_vocab_size))
    if vp_stage is not None:
        kwargs["vp_stage"] = vp_stage
    if meta_device:
        with torch.device("meta"):
            model = GPTModel(**kwargs)
    else:
        model = GPTModel(**kwargs)
    set_rotary_inv_freq(model, arch)
    return model


def mask_padded_vocabulary(model, vocab_size: int, padded_vocab_size: int) -> None:
    """Give the padded vocabulary rows' logits -inf, so a loss the model computes (labels given to GPTModel) leaves
    them out of the softmax as HF's loss, which has no such rows, does. No-op without padding or output layer.

    With labels, megatron-core's cross-entropy runs on the [s, b, v] logits; returning logits instead copies them to
    [b, s, v] (and, in training, their gradient back): CPU, SmolLM2 at 2 x 256 tokens, ~0.3 s of a ~4 s step.
    Used by the trainer and by evaluate.
    """
    import torch
    from megatron.core import parallel_state as ps

    layer = getattr(model, "output_layer", None)
    if layer is None or padded_vocab_size <= vocab_size:
        return
    tp_rank = ps.get_tensor_model_parallel_rank()

    def hook(module, inputs, output):
        logits, rest = (output[0], output[1:]) if isinstance(output, tuple) else (output, None)
        start = tp_rank * logits.shape[-1]  # this rank's vocabulary slice
        if start + logits.shape[-1] <= vocab_size:
            return None
        padded = torch.arange(start, start + logits.shape[-1], device=logits.device) >= vocab_size
        logits = logits.masked_fill(padded, float("-inf"))
        return logits if rest is None else (logits, *rest)

    layer.register_forward_hook(hook)


def set_rotary_inv_freq(model, arch: LlamaArch) -> None:
    """Install transformers-exact RoPE frequencies (Llama-3.1 scaling included); not part of the state dict."""
    rope = getattr(model, "rotary_pos_emb", None)
    if rope is not None and rope.inv_freq.device.type != "meta":
        rope.inv_freq = arch.rotary_inv_freq().to(rope.inv_freq.device)


def load_model_weights(model, ckpt_dir: str | Path) -> None:
    """Load this rank's part of a torch_dist checkpoint into a model built at any TP/PP (megatron-core reshards);
    a trainable-only save is completed from its base."""
    from llamapro_megatron.checkpoint import trainable

    state = trainable.load({"model": model.sharded_state_dict()}, ckpt_dir, read_meta(ckpt_dir), strict=True)
    model.load_state_dict(state["model"])
