"""The trainer on a tiny expanded model (4 -> 6 layers, fp16 weights, bf16 training), two 4-rank gloo worlds.

World A: convert + expand at TP2 PP2; train 2N steps with the plain and with the distributed optimizer
(gradient accumulation over 4 micro batches, a two-corpus blend with validation); a NaN run; a run whose first
pipeline stage trains nothing; then a distributed-optimizer run whose rank 1 is SIGKILLed at step N+1.
World B: resume the killed run for N more steps; resume the plain run from step N; resume the distributed run
at another layout (TP1 PP2, DP2); resume the stage-without-parameters run.

Checks: frozen tensors bit-identical to the (fp16) originals and every new-block tensor changed; resumed runs
equal the uninterrupted ones bit for bit (losses, weights, optimizer state); the other layout within tolerance.
"""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from llamapro_megatron.runtime import WorkerError, run_workers
from tests.data_artifacts import artifact
from tests.tiny_models import make_tiny_hf

N = 2  # steps before the checkpoint the resumes start from; runs are 2N steps
NEW_LAYERS = [2, 5]  # interleave(4 layers, 2 groups)
COMMON = ["--micro-batch-size", "2", "--global-batch-size", "8", "--seq-length", "32", "--train-iters", str(2 * N),
          "--lr", "5e-3", "--min-lr", "5e-4", "--lr-warmup-iters", "1", "--log-interval", "2", "--eval-interval",
          str(N), "--eval-iters", "1", "--save-interval", str(N), "--bf16", "--split", "90,10,0", "--seed", "7"]
TP2PP2 = ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]
# Layer 4 sits on pipeline stage 1: stage 0 (embedding, layers 0-2) has nothing to train.
EMPTY_STAGE = ["--freeze", "layers", "--trainable-layers", "4", "--lr-warmup-iters", "0"]
LAYOUT_TOLERANCE = 2e-2  # bf16 TP1 vs TP2: different reduction orders; loss ~5.3


def _corpora(root: Path) -> list[str]:
    """Two indexed datasets of random documents over the tiny vocabulary (ids 3..199, EOD = 2)."""
    from llamapro_megatron.runtime import prepare

    prepare()
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(0)
    prefixes = []
    for name, docs in (("code", 60), ("math", 40)):
        prefix = str(root / f"{name}_text_document")
        builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
        for _ in range(docs):
            builder.add_item(torch.tensor([*rng.integers(3, 200, rng.integers(20, 90)), 2]))
            builder.end_document()
        builder.finalize(prefix + ".idx")
        prefixes.append(prefix)
    return prefixes


def _train(argv: list[str], on_step=None):
    from llamapro_megatron.training.config import config_from_argv
    from llamapro_megatron.training.trainer import train

    return train(config_from_argv(argv), on_step=on_step)


def _save(root: str, name: str, value) -> None:
    import torch.distributed as dist

    if int(os.environ["RANK"]) == 0:
        Path(root, f"{name}.json").write_text(json.dumps(value))
    if dist.is_initialized():
        dist.barrier()


def _world_a(root: str, data: list[str], common: list[str]) -> None:
    from llamapro_megatron.checkpoint.convert import hf_to_mcore
    from llamapro_megatron.checkpoint.expand import expand_mcore
    from llamapro_megatron.errors import UserError
    from llamapro_megatron.expansion import interleave
    from llamapro_megatron.training.trainer import TrainingDiverged

    r = Path(root)
    hf_to_mcore(r / "hf", r / "base", tp=2, pp=2, progress=False)
    expand_mcore(r / "base", r / "pro", lambda n: interleave(n, 2), tp=2, pp=2, progress=False)
    base = [*common, *TP2PP2, "--load", str(r / "pro"), "--data-path", "0.7", data[0], "0.3", data[1]]
    plain = _train([*base, "--save", str(r / "P"), "--tensorboard-dir", str(r / "tb")])
    _save(root, "plain", {"losses": plain.losses, "eval": plain.eval_losses, "parameters": plain.parameter_counts})
    dist_opt = _train([*base, "--save", str(r / "D"), "--use-distributed-optimizer"])
    _save(root, "dist", {"losses": dist_opt.losses, "eval": dist_opt.eval_losses})
    # the fused loss's wiring and math at TP 2 (vocab-parallel reductions). TorchDynamo off: megatron-core's
    # compiled functions run as their eager ops (compiling them costs ~20 s per rank on this CPU; the GPU tests
    # check the compiled kernels)
    import megatron.core.models.common.language_module.language_module as fused_ce  # the model's loss calls it
    import torch._dynamo

    real, calls = fused_ce.fused_vocab_parallel_cross_entropy, []
    fused_ce.fused_vocab_parallel_cross_entropy = lambda *args: calls.append(1) or real(*args)
    torch._dynamo.config.disable = True
    try:
        fused = _train([*base, "--cross-entropy-loss-fusion"])
    finally:
        torch._dynamo.config.disable = False
        fused_ce.fused_vocab_parallel_cross_entropy = real
    Path(root, f"fused_ce_calls.{os.environ['RANK']}").write_text(str(len(calls)))  # train() ended the world
    _save(root, "fused_ce", {"losses": fused.losses, "eval": fused.eval_losses})
    try:
        _train([*base, "--train-iters", "3", "--lr", "1e30", "--save-interval", "100"])
        message = None
    except TrainingDiverged as e:
        message = str(e)
    _save(root, "nan", message)
    empty = _train([*base, *EMPTY_STAGE, "--train-iters", "1", "--save", str(r / "E")])
    _save(root, "empty_stage", empty.losses)
    try:  # the torch-Adam distributed optimizer cannot checkpoint a rank without parameters: refused up front
        _train([*base, *EMPTY_STAGE, "--train-iters", "1", "--use-distributed-optimizer"])
        refused = None
    except UserError as e:
        refused = str(e)
    _save(root, "empty_stage_dist", refused)

    def kill_rank1(step: int, loss: float) -> None:
        if step == N + 1 and int(os.environ["RANK"]) == 1:
            os.kill(os.getpid(), signal.SIGKILL)

    _train([*base, "--save", str(r / "K"), "--use-distributed-optimizer"], on_step=kill_rank1)


def _world_b(root: str, data: list[str], common: list[str]) -> dict:
    r = Path(root)
    blend = [*common, "--data-path", "0.7", data[0], "0.3", data[1]]
    out = {}
    out["killed"] = _train([*TP2PP2, *blend, "--load", str(r / "K"), "--save", str(r / "K"),
                            "--use-distributed-optimizer"]).losses
    out["plain"] = _train([*TP2PP2, *blend, "--load", str(r / "P"), "--ckpt-step", str(N), "--save",
                           str(r / "P2")]).losses
    out["layout"] = _train([*blend, "--pipeline-model-parallel-size", "2", "--load", str(r / "D"),
                            "--ckpt-step", str(N), "--save", str(r / "D3"), "--use-distributed-optimizer"]).losses
    out["empty_stage"] = _train([*TP2PP2, *blend, *EMPTY_STAGE, "--train-iters", "2", "--load", str(r / "E"),
                                 "--save", str(r / "E")]).losses
    return out


def _tensors(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = ckpt_dir.parent / f"{ckpt_dir.parent.name}_{ckpt_dir.name}.pt"
    dcp_to_torch_save(str(ckpt_dir), str(out))
    return {k: v for k, v in torch.load(out, weights_only=False).items() if isinstance(v, torch.Tensor)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    make_tiny_hf(root / "hf", "gqa", dtype=torch.float16)
    data = _corpora(root)
    tokenizer = str(artifact("tokenizer.model.v1"))  # only its EOD id (2) matters to the dataset
    common = [*COMMON, "--tokenizer-model", tokenizer]
    with pytest.raises(WorkerError) as killed:
        run_workers(_world_a, 4, args=(str(root), data, common), timeout_s=900)
    assert killed.value.rank == 1 and killed.value.exitcode == -signal.SIGKILL, killed.value
    a = {name: json.loads((root / f"{name}.json").read_text()) for name in ("plain", "dist", "nan", "empty_stage",
                                                                       "empty_stage_dist", "fused_ce")}
    b = run_workers(_world_b, 4, args=(str(root), data, common), timeout_s=900)[0]
    return root, a, b


def _after(losses: dict, start: int) -> list[float]:
    return [losses[k] for k in sorted(losses, key=int) if int(k) > start]


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_only_new_blocks_change_and_frozen_stay_bit_exact(runs):
    root, a, _ = runs
    start, end = _tensors(root / "pro" / "release"), _tensors(root / "P" / f"iter_{2 * N:07d}")
    model_keys = [k for k in start if not k.startswith("optimizer")]
    assert model_keys and set(model_keys) <= set(end)
    for key in model_keys:
        before, after = start[key], end[key]
        assert after.dtype == torch.float16, key  # stored in the originals' dtype, not the bf16 training dtype
        if key.startswith("decoder.layers."):  # stacked: [layer, ...]
            for layer in range(before.shape[0]):
                if layer in NEW_LAYERS:
                    assert not torch.equal(before[layer], after[layer]), (key, layer)
                else:
                    assert torch.equal(before[layer], after[layer]), (key, layer)
        else:
            assert torch.equal(before, after), key  # embedding, output layer, final norm
    losses = _after(a["plain"]["losses"], 0)
    assert len(losses) == 2 * N and all(4 < x < 7 for x in losses)  # random tokens over 200 ids: ~ln(200)
    assert sorted(a["plain"]["eval"], key=int) == [str(N), str(2 * N)]


@pytest.mark.slow
def test_fused_cross_entropy_trains_as_the_unfused_loss(runs):
    """--cross-entropy-loss-fusion at TP2 PP2 (padded vocabulary masked on the bf16 logits): the same training
    and validation losses as the fp32 ops, to fp32 rounding (1e-6 relative; loss ~5.3)."""
    root, a, _ = runs
    # only the last pipeline stage computes the loss: 2 ranks x (4 steps + 2 validations) x 4 micro batches
    calls = [int((root / f"fused_ce_calls.{rank}").read_text()) for rank in range(4)]
    assert sum(calls) == 2 * (2 * N + 2) * 4, calls
    for kind in ("losses", "eval"):
        plain, fused = a["plain"][kind], a["fused_ce"][kind]
        assert plain.keys() == fused.keys() and plain, kind
        for step, value in plain.items():
            assert abs(fused[step] - value) <= 1e-6 * abs(value), (kind, step, fused[step], value)


@pytest.mark.slow
def test_reported_parameter_counts_at_tp2_pp2_count_each_parameter_once(runs):
    """Norms are replicated over TP ranks and must count once; the padded vocabulary rows are real parameters."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from llamapro_megatron.checkpoint.mcore import read_meta

    root, a, _ = runs
    meta = read_meta(root / "pro" / "release")
    config = LlamaConfig(**{k: v for k, v in meta.arch.to_hf_config("float32").items() if k != "architectures"})
    hf = LlamaForCausalLM(config)
    padding = (meta.padded_vocab_size - config.vocab_size) * config.hidden_size * 2  # untied: embedding + output
    per_layer = sum(p.numel() for p in hf.model.layers[0].parameters())
    counts = a["plain"]["parameters"]
    assert counts["trainable"] == len(NEW_LAYERS) * per_layer
    assert counts["trainable"] + counts["frozen"] == hf.num_parameters() + padding


@pytest.mark.slow
def test_resume_after_sigkill_is_bit_exact(runs):
    root, a, b = runs
    assert (root / "K" / "latest_checkpointed_iteration.txt").read_text() == str(2 * N)
    assert _after(b["killed"], N) == _after(a["dist"]["losses"], N)
    uninterrupted, resumed = _tensors(root / "D" / f"iter_{2 * N:07d}"), _tensors(root / "K" / f"iter_{2 * N:07d}")
    assert set(uninterrupted) == set(resumed)
    assert any(k.startswith("optimizer") for k in resumed)
    for key in uninterrupted:
        assert torch.equal(uninterrupted[key], resumed[key]), key


@pytest.mark.slow
def test_plain_optimizer_resume_is_bit_exact(runs):
    root, a, b = runs
    assert _after(b["plain"], N) == _after(a["plain"]["losses"], N)
    uninterrupted, resumed = _tensors(root / "P" / f"iter_{2 * N:07d}"), _tensors(root / "P2" / f"iter_{2 * N:07d}")
    for key in uninterrupted:
        assert torch.equal(uninterrupted[key], resumed[key]), key


@pytest.mark.slow
def test_resume_at_another_layout_within_tolerance(runs):
    _, a, b = runs
    other, same = _after(b["layout"], N), _after(a["dist"]["losses"], N)
    assert len(other) == N
    assert max(abs(x - y) for x, y in zip(other, same)) < LAYOUT_TOLERANCE, (other, same)


@pytest.mark.slow
def test_nan_stops_naming_step_and_checkpoint(runs):
    _, a, _ = runs
    message = a["nan"]
    assert message is not None, "a loss of lr 1e30 did not diverge"
    assert "at step" in message and "Last good checkpoint" in message


@pytest.mark.slow
def test_stage_without_trainable_parameters_trains_saves_and_resumes(runs):
    root, a, b = runs
    assert list(a["empty_stage"]) == ["1"] and list(b["empty_stage"]) == [2]
    assert (root / "E" / "latest_checkpointed_iteration.txt").read_text() == "2"
    assert "own no trainable parameter" in a["empty_stage_dist"]


@pytest.mark.slow
def test_tensorboard_scalars_match_the_run(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, a, _ = runs
    events = EventAccumulator(str(root / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"lm-loss", "lm-loss-validation", "learning-rate", "grad-norm", "tokens-per-second",
            "tflops-per-device", "tflops-per-device-6n"} <= tags, tags
    logged = {e.step: e.value for e in events.Scalars("lm-loss")}
    assert sorted(logged) == [2, 4]  # --log-interval 2 over 4 steps
    for step, value in logged.items():  # TensorBoard stores float32
        assert value == pytest.approx(a["plain"]["losses"][str(step)], rel=1e-6)
    validation = {e.step: e.value for e in events.Scalars("lm-loss-validation")}
    assert validation and all(v == pytest.approx(a["plain"]["eval"][str(k)], rel=1e-6) for k, v in validation.items())
