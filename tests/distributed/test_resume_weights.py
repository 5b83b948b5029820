"""A resumed run continues from the weights the interrupted run had, not from the save's model part.

The model part of a training save is in the originals' dtype (fp16 here). An fp16 copy of a bf16 weight loses the
values below fp16's normal range (6.1e-5), which a zero-initialised down projection has after a few steps: the
resumed weights must be rounded from the optimizer's fp32 main params instead. A planted 4.1425e-6 (exact in bf16;
fp16 holds it as 4.1723e-6) shows which happened, with the plain and with the distributed optimizer (DP 2: each rank
rounds its own shard, then the weights are gathered), in bf16 and in fp32 training (where the weights are the
optimizer's own parameters). One 2-rank gloo world, ~20 s.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llamapro_megatron.runtime import run_workers
from tests.tiny_models import make_tiny_hf

PLANTED = 4.1425228118896484e-06  # a bf16 value below fp16's normal range
ARGS = ["--mock-data", "--micro-batch-size", "2", "--global-batch-size", "4", "--seq-length", "32", "--lr", "1e-3",
        "--eval-iters", "0", "--log-interval", "1", "--save-interval", "100"]


def _run(argv: list[str]):
    from llamapro_megatron.runtime import init_distributed
    from llamapro_megatron.training.config import config_from_argv
    from llamapro_megatron.training.trainer import _Run

    config = config_from_argv(argv)
    return _Run(config, init_distributed(seed=config.seed))


def _down_projections(run) -> list[torch.Tensor]:
    return [p for chunk in run.checkpointer.chunks for name, p in chunk.named_parameters()
            if p.requires_grad and "linear_fc2" in name]


def _world(root: str) -> dict:
    from llamapro_megatron.checkpoint.convert import hf_to_mcore
    from llamapro_megatron.checkpoint.expand import expand_mcore
    from llamapro_megatron.expansion import interleave
    from llamapro_megatron.runtime import destroy_distributed

    r = Path(root)
    hf_to_mcore(r / "hf", r / "base", progress=False)
    expand_mcore(r / "base", r / "pro", lambda n: interleave(n, 2), progress=False)
    seen = {}
    for name, extra in (("plain", ["--bf16"]), ("distributed", ["--bf16", "--use-distributed-optimizer"]),
                        ("plain_fp32", []), ("distributed_fp32", ["--use-distributed-optimizer"])):
        save = str(r / name)
        run = _run([*ARGS, *extra, "--load", str(r / "pro"), "--save", save, "--train-iters", "1"])
        run.run(None)  # one step, so that the optimizer has state to save
        with torch.no_grad():
            for p in _down_projections(run):
                p.fill_(PLANTED)
        run.optimizer.reload_model_params()  # the fp32 main params take the planted weights
        run.checkpointer.save(1, 4)
        destroy_distributed()
        resumed = _run([*ARGS, *extra, "--load", save, "--train-iters", "2"])
        weights = _down_projections(resumed)
        seen[name] = sorted({v for p in weights for v in p.float().unique().tolist()})
        destroy_distributed()
    return seen


@pytest.mark.slow
def test_resumed_weights_are_the_main_params_rounded_not_the_saved_copy(tmp_path):
    make_tiny_hf(tmp_path / "hf", "gqa", dtype=torch.float16)
    seen = run_workers(_world, 2, args=(str(tmp_path),), timeout_s=600)
    assert seen[0] == seen[1], seen
    fp16_copy = torch.tensor(PLANTED, dtype=torch.bfloat16).half().bfloat16().item()
    assert fp16_copy != PLANTED  # what loading the model part would give
    assert seen[0] == {name: [PLANTED] for name in ("plain", "distributed", "plain_fp32", "distributed_fp32")}, \
        json.dumps(seen)
