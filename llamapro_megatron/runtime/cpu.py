"""Run megatron-core on a machine without CUDA (CPU torch build, gloo backend).

megatron-core assumes CUDA in many places. :func:`enable_cpu_support` redirects each assumption to the CPU,
once per process. Line numbers are megatron-core 0.16.1 (the feasibility probe these redirects follow also
ran 0.19.2; this module is tested on 0.16.1):

1. RNG tracker. ``CudaRNGStatesTracker.add`` reads/seeds the CUDA RNG (``tensor_parallel/random.py:235-238``) and
   ``fork`` swaps states through ``_get_cuda_rng_state``/``_set_cuda_rng_state`` (``random.py:41,72``, used at
   ``:250,255,273,277`` and by activation recompute at ``:447,457``). Both are pointed at the CPU default generator:
   on CPU the tracker's named states are CPU RNG states, swapped in and out exactly like the CUDA ones.
2. ``torch.cuda.current_device()`` (``rotary_pos_embedding.py:162``, ``utils.py:631``,
   ``p2p_communication.py:313,321``, ``param_and_grad_buffer.py:800,806``, ``state_dict_saver.py:252``,
   ``distrib_optimizer.py:1077``, ``tensor_parallel/layers.py:261``) returns ``torch.device("cpu")``;
   ``torch.cuda.synchronize()`` (``p2p_communication.py:398``, ``filesystem_async.py:230``) is a no-op;
   ``torch.cuda.current_stream()``/``default_stream()`` return a stream stand-in whose waits are no-ops (0.16.1
   uses them in ``param_and_grad_buffer.py:422,529`` for multi-instance distributed optimizers only; 0.19 also
   in every ``start_grad_sync``).
3. Hard-coded CUDA placement: ``device="cuda"`` (``transformer/utils.py:35`` causal mask, ``schedules.py:596,2138``,
   ``clip_grads.py:103,174``, ``optimizer.py:481,485,907``, ``utils.py:1207``), ``.cuda()``
   (``distrib_optimizer.py:1089``), ``pin_memory``, and ``param.type() == 'torch.cuda.FloatTensor'`` checks
   (``clip_grads.py:167``, ``distrib_optimizer.py:361,420,582``). A :class:`~torch.overrides.TorchFunctionMode`
   rewrites CUDA device arguments to CPU, drops pinning, and makes ``Tensor.type()`` report ``torch.cuda.*`` to
   callers inside ``megatron.*`` only.
4. DistributedOptimizer with ``torch.optim.Adam``/``AdamW`` (megatron's fallback without TE/Apex): see
   :func:`fix_torch_adam_fallback`. Not CPU specific, so :func:`llamapro_megatron.runtime.prepare` applies it on
   every device; :func:`enable_cpu_support` applies it too.

Threads: the TorchFunctionMode of (3) is thread-local in torch, so it is entered in the thread that calls
:func:`enable_cpu_support` (normally the main thread, which builds models, runs the schedules, optimizer and
checkpointing). Patches (1), (2), (4) are process-wide. megatron-core 0.16.1 starts threads only in
``datasets/blended_megatron_dataset_builder.py:357`` (index building in numpy, no device arguments) and
``utils.py:1754`` (StragglerDetector, a CUDA-only feature); backward of a CPU graph runs in the calling thread;
dist_checkpointing parallelises with processes (forked ones inherit the forking thread's mode). A thread of
your own that runs megatron code calls :func:`enable_cpu_support` itself: it enters the mode in that thread.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from .compat import install_no_triton_shim

_LOCK = threading.Lock()
_THREAD = threading.local()
_cpu_patched = False
_adam_patched = False


def enable_cpu_support() -> bool:
    """Make megatron-core usable without CUDA; idempotent.

    Returns False (and changes nothing) when CUDA is available, else True once the redirects are active in the
    process and the device-argument mode is active in the calling thread.
    """
    global _cpu_patched
    if torch.cuda.is_available():
        return False
    with _LOCK:
        if not _cpu_patched:
            install_no_triton_shim()
            _patch_torch_cuda()
            _patch_rng_tracker()
            fix_torch_adam_fallback()
            _cpu_patched = True
    if not getattr(_THREAD, "mode", None):
        _THREAD.mode = _CudaToCpuMode()
        _THREAD.mode.__enter__()  # never exited: stays on this thread's torch-function mode stack
    return True


def cpu_support_active() -> bool:
    """True when :func:`enable_cpu_support` has patched this process and entered the mode in this thread."""
    return _cpu_patched and bool(getattr(_THREAD, "mode", None))


# ---- (2) torch.cuda device/stream queries ------------------------------------------------------------------


class _NullStream:
    """Stands in for a CUDA stream: CPU ops are synchronous, so every wait/record is a no-op."""

    def wait_stream(self, stream: object) -> None:
        pass

    def wait_event(self, event: object) -> None:
        pass

    def record_event(self, event: object = None) -> None:
        return None

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


_NULL_STREAM = _NullStream()


def _patch_torch_cuda() -> None:
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda device=None: None
    torch.cuda.current_stream = lambda device=None: _NULL_STREAM
    torch.cuda.default_stream = lambda device=None: _NULL_STREAM


# ---- (1) RNG tracker ---------------------------------------------------------------------------------------


def _cpu_get_rng_state(device: object = None, clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    return torch.get_rng_state()  # already a copy


def _cpu_set_rng_state(new_state: torch.Tensor, device: object = None, graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


@contextmanager
def _cuda_rng_api_on_cpu() -> Iterator[None]:
    """Temporarily route torch.cuda.get_rng_state/manual_seed (called directly by tracker.add) to the CPU RNG."""
    saved = torch.cuda.get_rng_state, torch.cuda.manual_seed
    torch.cuda.get_rng_state = _cpu_get_rng_state
    torch.cuda.manual_seed = torch.manual_seed
    try:
        yield
    finally:
        torch.cuda.get_rng_state, torch.cuda.manual_seed = saved


class _DropCpuRngWarning(logging.Filter):
    # random.py:263-265 warns when the CPU RNG advanced inside fork(); on CPU the tracked state *is* the CPU RNG
    # (and fork restores it on exit), so the warning would fire on every random op under fork.
    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def _patch_recompute(function: Any) -> None:
    """Activation recomputation (``tensor_parallel.checkpoint``) re-runs megatron forward code inside the backward
    pass, which the schedule starts with ``torch.autograd.backward`` -- and a torch-function mode is switched off
    while it handles a call (this one, too). Re-enter the thread's mode around the recomputation."""
    original = function.backward

    def backward(ctx: Any, *grads: Any) -> Any:
        mode = getattr(_THREAD, "mode", None)
        if mode is None:
            return original(ctx, *grads)
        with mode:
            return original(ctx, *grads)

    function.backward = staticmethod(backward)


def _patch_rng_tracker() -> None:
    import megatron.core.tensor_parallel.random as mrandom

    mrandom._get_cuda_rng_state = _cpu_get_rng_state
    mrandom._set_cuda_rng_state = _cpu_set_rng_state
    original_add = mrandom.CudaRNGStatesTracker.add

    def add(self: Any, name: str, seed: int) -> None:
        with _cuda_rng_api_on_cpu():
            original_add(self, name, seed)

    mrandom.CudaRNGStatesTracker.add = add
    _patch_recompute(mrandom.CheckpointFunction)
    logging.getLogger(mrandom.__name__).addFilter(_DropCpuRngWarning())


# ---- (3) CUDA device arguments -----------------------------------------------------------------------------


def _is_cuda(device: object) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)  # a bare int device means a CUDA ordinal


def _called_from_megatron() -> bool:
    # frames: 0 this function, 1 __torch_function__, 2 the Python caller (C methods like Tensor.type add none)
    return sys._getframe(2).f_globals.get("__name__", "").startswith("megatron.")


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA placement requests to CPU; see the module docstring, item 3."""

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda or func is torch.Tensor.pin_memory:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            if not name.startswith("torch.cuda.") and _called_from_megatron():
                name = "torch.cuda." + name[len("torch.") :]
            return name
        if kwargs and (_is_cuda(kwargs.get("device")) or kwargs.get("pin_memory")):
            kwargs = dict(kwargs)
            if _is_cuda(kwargs.get("device")):
                kwargs["device"] = "cpu"
            if kwargs.get("pin_memory"):
                kwargs["pin_memory"] = False
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


# ---- (4) DistributedOptimizer + torch Adam ----------------------------------------------------------------


def fix_torch_adam_fallback() -> bool:
    """Fix megatron-core's DistributedOptimizer when the inner optimizer is ``torch.optim.Adam``/``AdamW``.

    Without TE/Apex megatron-core falls back to torch Adam, which keeps a per-parameter ``step`` tensor. Three
    bugs follow (megatron-core 0.16.1 ``optimizer/distrib_optimizer.py``), all caught by comparing a resumed run
    with an uninterrupted one:

    a. ``:940`` ``_set_main_param_and_optimizer_states`` copies every key of the param's optimizer state from
       the loaded tensors, but ``fully_reshardable`` loading (``:2101``) leaves ``step`` out -> ``KeyError: 'step'``.
       Fix: keys missing from the loaded tensors keep their current value (``step`` was already restored from the
       param groups by ``load_state_dict``).
    b. ``:825`` ``load_state_dict`` assigns ONE ``step`` tensor to every param's state; torch Adam increments it
       in place once per param, so after a reload the bias correction is silently wrong. Fix: give each param
       its own copy.
    c. ``:642`` ``state_dict`` asserts exactly one distinct ``step`` value, so a fresh optimizer (empty state)
       cannot build the sharded state dict needed to *load* a checkpoint. Fix: a completely empty state is
       primed as torch Adam would initialise it (step 0, zero moments), which leaves the first update unchanged.

    Each fix is a no-op unless the inner optimizer is torch Adam/AdamW. Idempotent; returns True.
    """
    global _adam_patched
    if _adam_patched:
        return True
    install_no_triton_shim()
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer as DO

    set_states, load_state_dict, state_dict = (
        DO._set_main_param_and_optimizer_states,
        DO.load_state_dict,
        DO.state_dict,
    )

    def _set_main_param_and_optimizer_states(self: Any, model_param: torch.Tensor, tensors: dict) -> None:
        if _uses_torch_adam(self) and not getattr(self.config, "use_precision_aware_optimizer_no_fp8_or_ds_fp8", 0):
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            current = self.optimizer.state[main_param]
            tensors = {**{k: v for k, v in current.items() if k not in tensors}, **tensors}  # (a)
        set_states(self, model_param, tensors)

    def _load_state_dict(self: Any, sd: dict) -> None:
        load_state_dict(self, sd)
        if _uses_torch_adam(self):
            for param_state in self.optimizer.state.values():  # (b)
                if isinstance(param_state.get("step"), torch.Tensor):
                    param_state["step"] = param_state["step"].clone()

    def _state_dict(self: Any) -> dict:
        if _uses_torch_adam(self) and not self.optimizer.state:  # (c)
            _prime_adam_state(self.optimizer)
        return state_dict(self)

    DO._set_main_param_and_optimizer_states = _set_main_param_and_optimizer_states
    DO.load_state_dict = _load_state_dict
    DO.state_dict = _state_dict
    _adam_patched = True
    return True


def _uses_torch_adam(optimizer: Any) -> bool:
    return isinstance(getattr(optimizer, "optimizer", None), (torch.optim.Adam, torch.optim.AdamW))


def _prime_adam_state(adam: torch.optim.Optimizer) -> None:
    """Create torch Adam's lazily initialised state (as its first ``step`` would) without updating anything."""
    for group in adam.param_groups:
        for param in group["params"]:
            state = adam.state[param]
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            if group.get("amsgrad"):
                state["max_exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
