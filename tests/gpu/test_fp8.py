"""FP8 training through Transformer Engine (`--fp8-format`), on a GPU with FP8 (Hopper or newer) and TE.

Checked on a tiny LLaMA (every GEMM dimension a multiple of 16, as FP8 GEMMs need): LLaMA Pro training with FP8
leaves the frozen tensors bit-identical and trains every new block; its losses track the bf16 run's over the same
batches; TE's FP8 scaling state (`_extra_state`) is in the save, and a resume from it reproduces the uninterrupted
losses; a run resumes FP8 -> bf16 and bf16 -> FP8; the FP8-trained checkpoint exports to Hugging Face and its logits
equal transformers' (fp32, as `llamapro verify`); a recipe the GPU lacks (MXFP8 before Blackwell) is refused naming
the reason. The CPU-side refusals are in tests/unit/test_fp8_config.py.
"""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

RESUME_TOL = 1e-3  # resumed vs uninterrupted losses (~5.3), as the bf16 test (kernels may reduce in another order)
FP8_LOSS_TOL = 0.05  # |FP8 - bf16| loss per step over the same batches (~5.3; e4m3 keeps 3 mantissa bits)


def _needs_fp8():
    from llamapro_megatron.runtime.specs import transformer_engine_available

    if not transformer_engine_available():
        pytest.skip("needs Transformer Engine")
    import transformer_engine.pytorch as te

    ok, reason = te.is_fp8_available(return_reason=True)
    if not ok:
        pytest.skip(f"this GPU has no FP8: {reason}")


@pytest.fixture(scope="module")
def pro(tmp_path_factory):
    from llamapro_megatron.checkpoint.convert import hf_to_mcore
    from llamapro_megatron.checkpoint.expand import expand_mcore
    from llamapro_megatron.expansion import interleave
    from tests.tiny_models import make_tiny_hf

    _needs_fp8()
    tmp = tmp_path_factory.mktemp("fp8")
    make_tiny_hf(tmp / "hf", "gqa", dtype=torch.bfloat16)
    hf_to_mcore(tmp / "hf", tmp / "base", progress=False)
    expand_mcore(tmp / "base", tmp / "pro", lambda n: interleave(n, 2), progress=False)
    return tmp


COMMON = ["--mock-data", "--freeze", "llamapro", "--bf16", "--spec", "te", "--micro-batch-size", "2",
          "--global-batch-size", "4", "--seq-length", "64", "--lr", "5e-3", "--lr-warmup-iters", "1",
          "--log-interval", "1", "--eval-iters", "0", "--seed", "7"]
FP8 = ["--fp8-format", "hybrid"]


def _train(*argv):
    from llamapro_megatron.training.config import config_from_argv
    from llamapro_megatron.training.trainer import train

    return train(config_from_argv([*COMMON, *argv]))


def test_fp8_training_freezes_resumes_and_tracks_bf16(pro):
    from tests.distributed.test_training import _tensors

    full = _train(*FP8, "--load", str(pro / "pro"), "--save", str(pro / "A"), "--train-iters", "4",
                  "--save-interval", "2")
    bf16 = _train("--load", str(pro / "pro"), "--save", str(pro / "B16"), "--train-iters", "4",
                  "--save-interval", "2")
    assert sorted(full.losses) == [1, 2, 3, 4]
    for step in (1, 2, 3, 4):
        assert abs(full.losses[step] - bf16.losses[step]) < FP8_LOSS_TOL, (step, full.losses, bf16.losses)

    start, end = _tensors(pro / "pro" / "release"), _tensors(pro / "A" / "iter_0000004")
    model_keys = [k for k in start if not k.startswith("optimizer")]
    for key in model_keys:  # stored in the checkpoint's dtype: FP8 changes no saved weight's format
        before, after = start[key], end[key]
        assert after.dtype == before.dtype, key
        if key.startswith("decoder.layers."):  # stacked: [layer, ...]; new blocks at 2 and 5
            for layer in range(before.shape[0]):
                assert torch.equal(before[layer], after[layer]) == (layer not in (2, 5)), (key, layer)
        else:
            assert torch.equal(before, after), key
    extra = [k for k in end if k.endswith("_extra_state")]
    assert extra, "TE's FP8 scaling state is not in the FP8 save"

    resumed = _train(*FP8, "--load", str(pro / "A"), "--ckpt-step", "2", "--save", str(pro / "A2"),
                     "--train-iters", "4")
    assert sorted(resumed.losses) == [3, 4]
    for step in (3, 4):
        assert resumed.losses[step] == pytest.approx(full.losses[step], rel=RESUME_TOL)

    # FP8 -> bf16 and bf16 -> FP8: the same checkpoints resume in the other precision
    to_bf16 = _train("--load", str(pro / "A"), "--ckpt-step", "2", "--save", str(pro / "C"), "--train-iters", "4")
    to_fp8 = _train(*FP8, "--load", str(pro / "B16"), "--ckpt-step", "2", "--save", str(pro / "D"),
                    "--train-iters", "4")
    for step in (3, 4):
        assert abs(to_bf16.losses[step] - full.losses[step]) < FP8_LOSS_TOL
        assert abs(to_fp8.losses[step] - bf16.losses[step]) < FP8_LOSS_TOL


def test_fp8_trained_checkpoint_exports_and_verifies(pro):
    from llamapro_megatron.checkpoint.convert import mcore_to_hf
    from llamapro_megatron.verify import compare_logits, hf_logits, megatron_logits

    _train(*FP8, "--load", str(pro / "pro"), "--save", str(pro / "E"), "--train-iters", "2")
    mcore_to_hf(pro / "E", pro / "E_hf", progress=False)
    tokens = torch.randint(0, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    diff = compare_logits(hf_logits(pro / "E_hf", tokens), megatron_logits(pro / "E", tokens), 200)
    assert diff.max_abs_diff <= 1e-4 and diff.top1_agreement == 1.0, diff


def test_a_recipe_the_gpu_lacks_is_refused():
    from llamapro_megatron.errors import UserError
    from llamapro_megatron.runtime.specs import require_fp8_support, transformer_engine_available

    if not transformer_engine_available():
        pytest.skip("needs Transformer Engine")
    if torch.cuda.get_device_capability() >= (10, 0):
        pytest.skip("MXFP8 runs on Blackwell")
    with pytest.raises(UserError, match="--fp8-recipe mxfp8 cannot run on this GPU"):
        require_fp8_support("mxfp8")
