"""Import-time compatibility shims that must run before ``import megatron.core``.

Nothing here imports torch or megatron-core, so :func:`install_no_triton_shim` can run first thing.
"""

from __future__ import annotations

import gc
import importlib.util
import logging
import sys
import types
from pathlib import Path

# megatron-core >= 0.19: megatron/core/transformer/moe/ops/paged_stash.py:4 does `import triton` and is
# imported unconditionally by `import megatron.core`. Its kernels are only used by MoE paged stashing.
PAGED_STASH_MODULE = "megatron.core.transformer.moe.ops.paged_stash"


def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def weight_gradient_fusion_available() -> bool:
    """True when Apex's ``fused_weight_gradient_mlp_cuda`` imports: megatron-core's ColumnParallelLinear (the output
    layer, in every spec) refuses ``gradient_accumulation_fusion=True`` without it (``tensor_parallel/layers.py``),
    even where Transformer Engine's own linears could fuse the accumulation."""
    return importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is not None


def _megatron_core_dir() -> Path | None:
    # find_spec of a dotted name imports the parent ("megatron", a namespace package), never megatron.core.
    try:
        spec = importlib.util.find_spec("megatron.core")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _triton_missing_kernel(*args: object, **kwargs: object) -> None:
    raise RuntimeError(
        "MoE paged stashing needs the Triton kernels of megatron.core.transformer.moe.ops.paged_stash, "
        "but triton is not installed (a placeholder module was registered so megatron.core could import)."
    )


def install_no_triton_shim() -> bool:
    """Let ``import megatron.core`` succeed where triton is missing (megatron-core 0.19+).

    Registers a placeholder for :data:`PAGED_STASH_MODULE` in ``sys.modules``, exposing the module's public
    names (``GLOBAL_BLOCK_SIZE``, ``paged_stash_copy_kernel``, ``paged_stash_pop_kernel``); the kernels raise if
    called. Only acts when triton is not importable, megatron.core is not imported yet and the installed
    megatron-core actually ships that module (0.16.1 does not). Idempotent. Returns True when the placeholder
    is (now) registered.
    """
    existing = sys.modules.get(PAGED_STASH_MODULE)
    if existing is not None:
        return bool(getattr(existing, "__llamapro_placeholder__", False))
    if "megatron.core" in sys.modules or _triton_available():
        return False
    core_dir = _megatron_core_dir()
    if core_dir is None or not (core_dir / "transformer" / "moe" / "ops" / "paged_stash.py").is_file():
        return False
    placeholder = types.ModuleType(PAGED_STASH_MODULE, "Placeholder: triton is not installed (llamapro_megatron).")
    placeholder.__llamapro_placeholder__ = True
    placeholder.GLOBAL_BLOCK_SIZE = 1024  # the value in megatron-core 0.19.x
    placeholder.paged_stash_copy_kernel = _triton_missing_kernel
    placeholder.paged_stash_pop_kernel = _triton_missing_kernel
    placeholder.__all__ = ["GLOBAL_BLOCK_SIZE", "paged_stash_copy_kernel", "paged_stash_pop_kernel"]
    sys.modules[PAGED_STASH_MODULE] = placeholder
    return True


# megatron-core's notes at import/config time that say nothing a user can act on here: the layer spec (TE or not)
# is chosen and reported by this project (`runtime/specs.py`), "full scope" is megatron-core's own default, and the
# MIMO model (0.19, imported by megatron.core) is not used.
_MEGATRON_NOTES = ("Transformer Engine and Apex are not installed", "Apex is not installed",
                   "full scope is deprecated", "MimoModelConfig is experimental")
# PyTorch deprecations of APIs that megatron-core's checkpointing calls (`strategies/torch.py`) and its MoE token
# dispatch with TP > 1 (`tensor_parallel/mappings.py`, the gather/scatter of `_gather_along_first_dim`)
_MEGATRON_TORCH_DEPRECATIONS = ("`load_state_dict` is deprecated", "Please use DTensor instead and we are deprecating "
                                "ShardedTensor", "`torch.distributed.all_gather_into_tensor` is deprecated",
                                "`torch.distributed.reduce_scatter_tensor` is deprecated")
# PyTorch's notes on how megatron-core 0.19 calls `torch.distributed.checkpoint.load` (every rank reads its own part
# with `no_dist=True`, the reader passed by position: `strategies/torch.py`, `serialization.load_common_state_dict`)
_MEGATRON_TORCH_NOTES = ("torch.distributed is disabled, unavailable or uninitialized",
                         "The argument order of load has been changed")
# Log records (logger -> message prefixes) that are notes to megatron-core's or torch's developers, seen with
# megatron-core 0.19 and the CUDA build of torch on a machine without a GPU:
_LOG_NOTES = {
    # `models/gpt/gpt_model.py`: GPTModel is what this project builds (its successor, HybridModel, is 0.19-only)
    "megatron.core.models.gpt.gpt_model": ("GPTModel IS DEPRECATED",),
    # `dist_checkpointing/strategies/common.py`: reading a checkpoint's `common.pt`, which the project writes on
    # purpose so that megatron-core 0.16 can read it (`runtime/dist_ckpt.py`)
    "megatron.core.dist_checkpointing.strategies.common": ("load_common is deprecated",),
    # `torch/utils/cpp_extension.py` at import: the CUDA build of torch without a GPU runtime (nothing is compiled)
    "torch.utils.cpp_extension": ("No CUDA runtime is found",),
}


class _DropNotes(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def mute_megatron_notes() -> None:
    """Hide megatron-core's fallback notes (one per module and process: a 2-worker conversion printed 18 lines) and
    the developer notes of `_LOG_NOTES`; every other warning still shows. Idempotent."""
    import warnings

    for message in _MEGATRON_NOTES:
        warnings.filterwarnings("ignore", message=message, category=UserWarning)
    for message in _MEGATRON_TORCH_DEPRECATIONS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)
    for message in _MEGATRON_TORCH_NOTES:
        warnings.filterwarnings("ignore", message=message, category=UserWarning)
    for name, prefixes in _LOG_NOTES.items():
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropNotes) for f in log.filters):
            log.addFilter(_DropNotes(prefixes))


def import_megatron_core() -> None:
    """Import megatron.core with `torch.compile` deferred to each decorated function's first call.

    megatron-core decorates its fusion helpers with `torch.compile` at import time (`megatron/core/jit.py`:
    `jit_fuser = torch.compile`), which imports TorchDynamo: ~3.5 s per process on a 2-core CPU. Conversion and
    expansion workers never call those helpers, so the import is deferred, not skipped: the first call of a
    decorated function compiles it exactly as before. Idempotent; does nothing once megatron.core is imported.
    """
    if "megatron.core" in sys.modules:
        return
    import functools

    import torch

    real_compile = torch.compile

    def deferred_compile(model=None, **kwargs):
        if model is None:  # used as @torch.compile(...)
            return lambda fn: deferred_compile(fn, **kwargs)
        compiled = None

        @functools.wraps(model)
        def first_call_compiles(*args, **kw):
            nonlocal compiled
            if compiled is None:
                compiled = real_compile(model, **kwargs)
            return compiled(*args, **kw)

        return first_call_compiles

    torch.compile = deferred_compile
    try:
        import megatron.core  # noqa: F401
    finally:
        torch.compile = real_compile


def load_megatron_core() -> None:
    """Everything megatron-core needs before its first import here (notes muted, no-triton shim, deferred compile).

    `runtime.prepare` calls this; modules that need megatron-core at import time (the tokenizer's base class) call
    it directly. Idempotent.
    """
    mute_megatron_notes()
    install_no_triton_shim()
    import_megatron_core()
    define_moe_te_names()


# megatron-core 0.16.1 binds these names of moe_utils.py only when Transformer Engine imports (its lines 22-39)
_MOE_TE_NAMES = ("fused_compute_score_for_moe_aux_loss", "fused_moe_aux_loss", "fused_permute",
                 "fused_permute_with_probs", "fused_sort_chunks_by_index", "fused_sort_chunks_by_index_with_probs",
                 "fused_topk_with_score_function", "fused_unpermute", "te_general_gemm")


def define_moe_te_names() -> None:
    """Without Transformer Engine, bind moe_utils' TE helpers to None, as megatron-core 0.19 does itself.

    0.16.1's `router_gating_linear` reads `te_general_gemm` whatever is installed (moe_utils.py:1192, 1225), so
    without TE every MoE router forward raised NameError. Idempotent; changes nothing where the names exist.
    """
    from megatron.core.transformer.moe import moe_utils

    for name in _MOE_TE_NAMES:
        if not hasattr(moe_utils, name):
            setattr(moe_utils, name, None)


def import_frameworks() -> None:
    """Import torch and megatron-core (as :func:`load_megatron_core` does) with Python's cyclic GC paused, then
    freeze everything the imports left.

    The imports leave ~440k objects (~280k that live until exit, the rest cyclic garbage of the imports). With the
    GC running, its full collections walk them repeatedly during the import and again while the interpreter exits:
    start, import and exit took 2.8 s per process on a 2-core CPU, 2.0 s this way (``benchmarks/startup.py``).
    Frozen objects are never walked again. The garbage is frozen too rather than collected: collecting it cost
    ~0.2 s per process and returned no memory (RSS 290 MiB either way), on the critical path of every short-lived
    worker. Every rank of ``runtime.launch`` calls this before its job. Does nothing when both are imported already
    (a long-lived process keeps its GC as is).
    """
    if "torch" in sys.modules and "megatron.core" in sys.modules:
        return
    enabled = gc.isenabled()
    gc.disable()
    try:
        import torch  # noqa: F401

        load_megatron_core()
    finally:
        gc.freeze()
        if enabled:
            gc.enable()
