"""Start the ranks of a training run: this process under torchrun, else local spawned processes."""
from __future__ import annotations

from llamapro_megatron.errors import UserError
from llamapro_megatron.training.config import TrainConfig


def _rank_main(config: TrainConfig) -> str:
    from llamapro_megatron.training.trainer import train

    return train(config).exit_reason


def _status(exit_reason: str) -> int:
    from llamapro_megatron.training.trainer import STOPPED_BY_SIGNAL

    return STOPPED_BY_SIGNAL if exit_reason == "signal" else 0


def launch(config: TrainConfig, nproc: int | None = None) -> int:
    """Train on this launch's ranks (or on `nproc` local ones started here); returns the exit status."""
    from llamapro_megatron.arch import layout_world_size
    from llamapro_megatron.runtime.launch import WorkerError, inside_launcher, run_workers
    from llamapro_megatron.training.layout import check_world_size

    if inside_launcher():
        return _status(_rank_main(config))
    p = config.parallelism
    if nproc is None:
        n = layout_world_size(p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                              p.expert_model_parallel_size, p.expert_tensor_parallel_size)
    elif nproc < 1:
        raise UserError(f"--nproc {nproc}: must be at least 1")
    else:
        n = nproc
        check_world_size(n, p, "--nproc")  # before any rank starts, naming train's flags
    try:
        return _status(run_workers(_rank_main, n, args=(config,))[0])
    except WorkerError as e:
        lines = (e.remote_traceback or str(e)).strip().splitlines()
        raise UserError(f"training failed on rank {e.rank}: {lines[-1] if lines else e}") from e
