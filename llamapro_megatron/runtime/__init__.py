"""Runtime layer: megatron-core on CPU or GPU, process groups, local multi-process launches, layer specs.

Call :func:`prepare` before the first ``import megatron.core`` anywhere in the project: it installs the import
shims, enables CPU support when CUDA is absent, and fixes megatron's torch-Adam fallback. Importing this package
is cheap: it imports neither torch nor megatron-core; the names below load their submodule on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .compat import install_no_triton_shim
    from .cpu import cpu_support_active, enable_cpu_support, fix_torch_adam_fallback
    from .dist_ckpt import unstack_layer_keys
    from .distributed import ParallelInfo, destroy_distributed, init_distributed
    from .launch import WorkerError, free_port, inside_launcher, run_workers
    from .specs import SPEC_KINDS, gpt_layer_spec, resolve_spec_kind

_EXPORTS = {
    "unstack_layer_keys": "dist_ckpt",
    "install_no_triton_shim": "compat",
    "cpu_support_active": "cpu",
    "enable_cpu_support": "cpu",
    "fix_torch_adam_fallback": "cpu",
    "ParallelInfo": "distributed",
    "destroy_distributed": "distributed",
    "init_distributed": "distributed",
    "WorkerError": "launch",
    "free_port": "launch",
    "inside_launcher": "launch",
    "run_workers": "launch",
    "SPEC_KINDS": "specs",
    "gpt_layer_spec": "specs",
    "resolve_spec_kind": "specs",
}

__all__ = [
    "SPEC_KINDS",
    "ParallelInfo",
    "WorkerError",
    "cpu_support_active",
    "destroy_distributed",
    "enable_cpu_support",
    "fix_torch_adam_fallback",
    "free_port",
    "gpt_layer_spec",
    "init_distributed",
    "inside_launcher",
    "install_no_triton_shim",
    "prepare",
    "resolve_spec_kind",
    "run_workers",
    "unstack_layer_keys",
]
assert set(__all__) == {"prepare", *_EXPORTS}


def prepare() -> bool:
    """Make megatron-core importable and usable here; call before anything imports ``megatron.core``.

    Idempotent. Mutes megatron-core's fallback notes (no TE/Apex), installs the no-triton import shim
    (megatron-core 0.19+ without triton), enables CPU support when CUDA is not available, fixes
    DistributedOptimizer's torch-Adam fallback (needed on GPUs without TE/Apex too) and makes checkpoint loading
    restricted (`safe_load`). Returns True when CPU support is active.
    """
    from .compat import load_megatron_core

    load_megatron_core()
    from .cpu import enable_cpu_support, fix_torch_adam_fallback

    on_cpu = enable_cpu_support()
    fix_torch_adam_fallback()
    from .safe_load import install

    install()  # checkpoints are data: DCP's unrestricted loads become restricted ones
    return on_cpu


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
