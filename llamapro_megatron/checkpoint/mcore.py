"""Megatron checkpoints: Megatron-LM's directory layout, the project's metadata (`llamapro.json`), `--load`.

Layout (as Megatron-LM writes it):
    SAVE/latest_checkpointed_iteration.txt      "release" (converted) or the last iteration number
    SAVE/release/ | SAVE/iter_0000500/          a torch_dist checkpoint (megatron-core dist_checkpointing)
        llamapro.json                           architecture, padded vocab, dtype, layout, source, expansion
        tokenizer/                              tokenizer files, when the source had them
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llamapro_megatron import __version__
from llamapro_megatron.arch import LlamaArch
from llamapro_megatron.checkpoint.meta_check import check_meta
from llamapro_megatron.errors import UserError

META_FILE = "llamapro.json"
LATEST_FILE = "latest_checkpointed_iteration.txt"
TOKENIZER_DIR = "tokenizer"
RELEASE = "release"


def recorded_layout(tp: int, pp: int, vpp: int | None, ep: int = 1, etp: int | None = None) -> dict[str, int | None]:
    """The intended layout a checkpoint's metadata records (EP and ETP only for MoE layouts that set them)."""
    return {"tp": tp, "pp": pp, "vpp": vpp, **({"ep": ep} if ep != 1 else {}), **({"etp": etp} if etp else {})}


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
    def from_json(cls, text: str, source: str = META_FILE) -> CheckpointMeta:
        """Parsed and checked (`checkpoint.meta_check`); a bad file raises a UserError naming `source`."""
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{source} is not valid JSON ({e}). The checkpoint is damaged") from None
        check_meta(d, source, cls)
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
        tag = latest.read_text(errors="replace").strip()
        if tag != RELEASE and not (tag.isascii() and tag.isdigit()):
            raise UserError(f"{latest} says {tag[:40]!r}; it must hold {RELEASE!r} or an iteration number. The save "
                            "directory is damaged: pass --ckpt-step N to load iteration N")
        path = load / (RELEASE if tag == RELEASE else iteration_dir_name(int(tag)))
    if not (path / META_FILE).is_file():
        raise UserError(f"{path} has no {META_FILE}: not a checkpoint written by llamapro-megatron (or incomplete)")
    return path


def read_meta(ckpt_dir: str | Path) -> CheckpointMeta:
    path = Path(ckpt_dir) / META_FILE
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror or e})") from None
    return CheckpointMeta.from_json(text, str(path))
