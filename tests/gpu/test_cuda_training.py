"""The GPU path without Transformer Engine: the sdpa spec's kernels and the trainer on CUDA (NCCL, bf16).

On a CUDA machine with or without TE. Checked: the sdpa spec equals the local spec on CUDA with each attention
kernel (fp32 within 1e-5 relative; bf16 within 1e-2 of the fp32 reference, the bf16 rounding range); conversion
with 2 workers on a host of any GPU count (its workers see no GPU); LLaMA Pro training in bf16 on the GPU with the
distributed optimizer: frozen tensors bit-identical, every new-block tensor changed, a checkpointed resume
reproduces the uninterrupted losses; the compiled RoPE and the fused cross-entropy equal megatron-core's eager ops.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

FP32_TOL = 1e-5  # sdpa vs local, fp32 on CUDA, relative Frobenius norm (TF32 off)
BF16_TOL = 1e-2  # bf16 logits vs the fp32 reference, relative Frobenius norm (bf16 has 8 mantissa bits)
RESUME_TOL = 1e-3  # resumed vs uninterrupted losses (~5.3), bf16 on a GPU: kernels may reduce in another order


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture
def world_of_1():
    from llamapro_megatron.runtime import destroy_distributed, init_distributed

    info = init_distributed(tp=1, pp=1)
    yield info
    destroy_distributed()


def _gpt(kind: str, dtype: torch.dtype):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    from llamapro_megatron.runtime import gpt_layer_spec

    # head dim 64 and a bf16 sequence of 512: the shapes where the sdpa spec takes the flash kernel
    config = TransformerConfig(
        num_layers=2, hidden_size=256, ffn_hidden_size=512, num_attention_heads=4, num_query_groups=2,
        normalization="RMSNorm", layernorm_epsilon=1e-5, gated_linear_unit=True,
        activation_func=torch.nn.functional.silu, add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
        params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype == torch.bfloat16,
    )
    model = GPTModel(config=config, transformer_layer_spec=gpt_layer_spec(kind), vocab_size=384,
                     max_sequence_length=512, position_embedding_type="rope",
                     share_embeddings_and_output_weights=False)
    return model.cuda().eval()


@pytest.mark.parametrize("backend", ["auto", "flash", "cudnn", "efficient"])
def test_sdpa_spec_matches_local_spec_on_cuda(world_of_1, monkeypatch, backend):
    """Every LLAMAPRO_SDPA_BACKEND kernel in bf16 (and auto in fp32, where flash/cuDNN do not run) against the
    local spec's fp32 logits."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # fp32 means fp32 here
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    torch.manual_seed(0)
    reference = _gpt("local", torch.float32)
    weights = {k: v for k, v in reference.state_dict().items() if not k.endswith("_extra_state")}
    tokens = torch.randint(0, 384, (2, 512), device="cuda")
    positions = torch.arange(512, device="cuda").unsqueeze(0).expand(2, -1)
    with torch.no_grad():
        ref = reference(tokens, positions, attention_mask=None).float()
    assert torch.isfinite(ref).all()
    monkeypatch.setenv("LLAMAPRO_SDPA_BACKEND", backend)
    dtypes = (torch.bfloat16, torch.float32) if backend in ("auto", "efficient") else (torch.bfloat16,)
    for dtype in dtypes:
        model = _gpt("sdpa", dtype)
        model.load_state_dict({k: v.to(dtype) for k, v in weights.items()}, strict=False)
        with torch.no_grad():
            logits = model(tokens, positions, attention_mask=None).float()
        assert _rel(logits, ref) < (FP32_TOL if dtype == torch.float32 else BF16_TOL), (backend, dtype)


def test_auto_backend_takes_cudnn_attention_on_hopper():
    from llamapro_megatron.runtime.sdpa import _cudnn_takes, _prefers_cudnn

    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("auto prefers cuDNN attention on Hopper and newer only")
    assert _prefers_cudnn(torch.cuda.current_device())
    q = torch.randn(2, 4, 512, 64, device="cuda", dtype=torch.bfloat16)  # [b, h, s, d], 2 KV groups below
    kv = torch.randn(2, 2, 512, 64, device="cuda", dtype=torch.bfloat16)
    assert _cudnn_takes(q, kv, kv, None, 0.0, True, True) or _cudnn_takes(q, q, q, None, 0.0, True, False)


def test_llamapro_training_on_cuda_bf16(tmp_path):
    from llamapro_megatron.checkpoint.convert import hf_to_mcore
    from llamapro_megatron.checkpoint.expand import expand_mcore
    from llamapro_megatron.expansion import interleave
    from llamapro_megatron.runtime import resolve_spec_kind
    from llamapro_megatron.runtime.specs import transformer_engine_available
    from llamapro_megatron.training.config import config_from_argv
    from llamapro_megatron.training.trainer import train
    from tests.distributed.test_training import _tensors  # a checkpoint's tensors, read with torch's DCP tools
    from tests.tiny_models import make_tiny_hf

    assert resolve_spec_kind("auto") == ("te" if transformer_engine_available() else "sdpa")
    make_tiny_hf(tmp_path / "hf", "gqa", dtype=torch.float16)
    # two conversion workers on a host with one GPU: they must not claim GPUs (LOCAL_RANK 1 has none)
    hf_to_mcore(tmp_path / "hf", tmp_path / "base", progress=False, workers=2)
    expand_mcore(tmp_path / "base", tmp_path / "pro", lambda n: interleave(n, 2), progress=False, workers=2)
    common = ["--mock-data", "--freeze", "llamapro", "--bf16", "--use-distributed-optimizer", "--micro-batch-size",
              "2", "--global-batch-size", "4", "--seq-length", "64", "--train-iters", "4", "--lr", "5e-3",
              "--lr-warmup-iters", "1", "--log-interval", "1", "--eval-iters", "0", "--save-interval", "2",
              "--seed", "7"]
    torch.cuda.reset_peak_memory_stats()
    full = train(config_from_argv([*common, "--load", str(tmp_path / "pro"), "--save", str(tmp_path / "A")]))
    assert torch.cuda.max_memory_allocated() > 0  # the model lived on the GPU
    resumed = train(config_from_argv([*common, "--load", str(tmp_path / "A"), "--ckpt-step", "2",
                                      "--save", str(tmp_path / "B")]))
    assert sorted(full.losses) == [1, 2, 3, 4] and sorted(resumed.losses) == [3, 4]
    assert all(4 < full.losses[i] < 7 for i in full.losses)  # random tokens over 200 ids: ~ln(200)
    for step in (3, 4):
        assert resumed.losses[step] == pytest.approx(full.losses[step], rel=RESUME_TOL)
    assert full.parameter_counts["trainable"] > 0

    start, end = _tensors(tmp_path / "pro" / "release"), _tensors(tmp_path / "A" / "iter_0000004")
    model_keys = [k for k in start if not k.startswith("optimizer")]
    assert model_keys and set(model_keys) <= set(end)
    for key in model_keys:
        before, after = start[key], end[key]
        assert after.dtype == torch.float16, key
        if key.startswith("decoder.layers."):  # stacked: [layer, ...]
            for layer in range(before.shape[0]):
                assert torch.equal(before[layer], after[layer]) == (layer not in (2, 5)), (key, layer)
        else:
            assert torch.equal(before, after), key


def test_compiled_rope_matches_megatrons_unfused_rope(world_of_1, monkeypatch):
    """The route runs megatron's own RoPE function compiled: logits and gradients as the eager ops give them."""
    from llamapro_megatron.runtime.rope import set_rope_fusion

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    tokens = torch.randint(0, 384, (2, 512), device="cuda")
    positions = torch.arange(512, device="cuda").unsqueeze(0).expand(2, -1)
    # gradients: a reduction over batch and sequence, so more rounding than the logits
    for dtype, tol, grad_tol in ((torch.float32, FP32_TOL, 1e-4), (torch.bfloat16, BF16_TOL, 5e-2)):
        torch.manual_seed(0)
        model = _gpt("sdpa", dtype).train()
        results = []
        try:
            for fused in (False, True):
                set_rope_fusion(fused)
                model.zero_grad(set_to_none=True)
                logits = model(tokens, positions, attention_mask=None)
                logits.float().square().mean().backward()
                grad = model.decoder.layers[0].self_attention.linear_qkv.weight.grad.float()
                results.append((logits.detach().float(), grad))
        finally:
            set_rope_fusion(False)
        (eager_logits, eager_grad), (fused_logits, fused_grad) = results
        assert _rel(fused_logits, eager_logits) < tol, dtype
        assert _rel(fused_grad, eager_grad) < grad_tol, dtype


def test_fused_cross_entropy_matches_the_unfused_loss_on_cuda(world_of_1):
    """--cross-entropy-loss-fusion: megatron-core's compiled kernels on bf16 logits give the unfused fp32 ops'
    losses and logit gradients (what the model's loss runs with and without the flag)."""
    from megatron.core import parallel_state as ps
    from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    torch.manual_seed(0)
    logits = (torch.randn(2, 1024, 32000, device="cuda") * 3).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, 32000, (2, 1024), device="cuda")
    results = []
    for fused in (False, True):
        logits.grad = None
        if fused:
            loss = fused_vocab_parallel_cross_entropy(logits, labels, ps.get_tensor_model_parallel_group())
        else:
            loss = vocab_parallel_cross_entropy(logits.float(), labels)
        loss.mean().backward()
        results.append((loss.detach(), logits.grad.float()))
    (loss_u, grad_u), (loss_f, grad_f) = results
    assert _rel(loss_f, loss_u) < 1e-6  # both fp32 after the same upcast
    assert _rel(grad_f, grad_u) < BF16_TOL  # both cast to the logits' bf16


def test_verify_evaluate_and_generate_on_cuda(tmp_path):
    """The checking commands on a GPU (spawned NCCL worlds of 1, the sdpa spec's CUDA kernels): logits equal
    transformers' (fp32, as `llamapro verify`), perplexity equals the HF path's, greedy tokens equal transformers'
    `generate`."""
    from llamapro_megatron.checkpoint.convert import hf_to_mcore
    from llamapro_megatron.evaluate import evaluate
    from llamapro_megatron.generate import generate
    from llamapro_megatron.verify import compare_logits, hf_logits, megatron_logits
    from tests.distributed.test_evaluate import _tiny_tokenizer
    from tests.tiny_models import make_tiny_hf

    words = [f"w{i % 37}{'ab'[i % 2]}" for i in range(4000)]  # no network there: a synthetic corpus
    hf = make_tiny_hf(tmp_path / "hf", "gqa")
    _tiny_tokenizer(hf, " ".join(words[:2000]))
    (tmp_path / "held_out.txt").write_text(" ".join(reversed(words)))
    hf_to_mcore(hf, tmp_path / "ckpt", progress=False)
    tokens = torch.randint(0, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    diff = compare_logits(hf_logits(hf, tokens), megatron_logits(tmp_path / "ckpt", tokens), 200)
    assert diff.max_abs_diff <= 1e-4 and diff.top1_agreement == 1.0, diff
    data = {"held_out": str(tmp_path / "held_out.txt")}
    ours = evaluate(data, load=tmp_path / "ckpt", seq_length=32, max_tokens=600, progress=False)[0]
    reference = evaluate(data, hf_dir=hf, seq_length=32, max_tokens=600, progress=False)[0]
    assert ours.tokens == reference.tokens and ours.loss == pytest.approx(reference.loss, rel=1e-5)
    prompts = ["w1a w2b w3a", "w30b"]
    assert generate(prompts, load=tmp_path / "ckpt", max_new_tokens=8) == generate(prompts, hf_dir=hf,
                                                                                   max_new_tokens=8)
