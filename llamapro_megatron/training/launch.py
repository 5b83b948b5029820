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

    if inside_launcher():
        return _status(_rank_main(config))
    p = config.parallelism
    fewest = layout_world_size(p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                               p.expert_model_parallel_size, p.expert_tensor_parallel_size)
    n = fewest if nproc is None else nproc
    if n < 1:
        raise UserError(f"--nproc {n}: must be at least 1")
    if n % fewest:
        experts = (f", --expert-model-parallel-size {p.expert_model_parallel_size}"
                   + (f", --expert-tensor-parallel-size {p.expert_tensor_parallel_size}"
                      if p.expert_tensor_parallel_size is not None else "")
                   if p.expert_model_parallel_size > 1 or p.expert_tensor_parallel_size is not None else "")
        raise UserError(f"--nproc {n}: the layout (--tensor-model-parallel-size {p.tensor_model_parallel_size}, "
                        f"--pipeline-model-parallel-size {p.pipeline_model_parallel_size}{experts}) runs on a "
                        f"multiple of {fewest} ranks")
    try:
        return _status(run_workers(_rank_main, n, args=(config,))[0])
    except WorkerError as e:
        lines = (e.remote_traceback or str(e)).strip().splitlines()
        raise UserError(f"training failed on rank {e.rank}: {lines[-1] if lines else e}") from e
