"""Start the ranks of a training run: this process under torchrun, else local spawned processes."""
from __future__ import annotations

from llamapro_megatron.errors import UserError
from llamapro_megatron.training.config import TrainConfig


def _rank_main(config: TrainConfig):
    from llamapro_megatron.training.trainer import train

    result = train(config)
    return result.iteration


def launch(config: TrainConfig, nproc: int | None = None) -> None:
    from llamapro_megatron.arch import layout_world_size
    from llamapro_megatron.runtime.launch import WorkerError, inside_launcher, run_workers

    if inside_launcher():
        _rank_main(config)
        return
    p = config.parallelism
    n = nproc or layout_world_size(p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                                   p.expert_model_parallel_size, p.expert_tensor_parallel_size)
    try:
        run_workers(_rank_main, n, args=(config,))
    except WorkerError as e:
        lines = (e.remote_traceback or str(e)).strip().splitlines()
        raise UserError(f"training failed on rank {e.rank}: {lines[-1] if lines else e}") from e
