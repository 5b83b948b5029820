"""llamapro_megatron.runtime in this process: spec resolution, CPU redirects, init/destroy/re-init, the checkpoint
patches, the RoPE route. (run_workers, which starts ranks: tests/distributed/test_launch.py.)"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import torch

from llamapro_megatron.errors import UserError
from llamapro_megatron.runtime import resolve_spec_kind

REPO = Path(__file__).resolve().parents[2]


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def test_spec_auto_is_sdpa_and_te_is_refused_without_cuda():
    assert resolve_spec_kind() == "sdpa"
    assert resolve_spec_kind("auto") == "sdpa"
    assert resolve_spec_kind("LOCAL") == "local"
    assert resolve_spec_kind("sdpa") == "sdpa"
    with pytest.raises(UserError, match="needs CUDA"):
        resolve_spec_kind("te")
    with pytest.raises(UserError, match="unknown layer spec 'flash' \\(--spec\\)"):
        resolve_spec_kind("flash")


def test_local_spec_uses_rmsnorm_and_maps_keys_to_te_names():
    from llamapro_megatron.runtime import gpt_layer_spec

    spec = gpt_layer_spec("local", normalization="RMSNorm")
    keys_map = spec.submodules.sharded_state_dict_keys_map
    assert keys_map["input_layernorm."] == "self_attention.linear_qkv.layer_norm_"
    assert keys_map["pre_mlp_layernorm."] == "mlp.linear_fc1.layer_norm_"
    with pytest.raises(UserError, match="normalization"):
        gpt_layer_spec("local", normalization="BatchNorm")


@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_local_spec_norms_are_torch_norms_marked_for_sequence_parallel_gradient_reduction(sequence_parallel):
    """megatron-core's WrappedTorchNorm refuses sequence parallelism; TorchNorm builds the same torch module and marks
    its parameters as finalize_model_grads expects (summed over TP under sequence parallelism)."""
    import torch
    from megatron.core.transformer import TransformerConfig

    from llamapro_megatron.runtime import gpt_layer_spec
    from llamapro_megatron.runtime.specs import TorchNorm

    layer = gpt_layer_spec("local", qk_layernorm=True, num_experts=4).submodules
    attention = layer.self_attention.submodules
    assert {layer.input_layernorm, layer.pre_mlp_layernorm, attention.q_layernorm, attention.k_layernorm} == {TorchNorm}
    for normalization, cls in (("RMSNorm", torch.nn.RMSNorm), ("LayerNorm", torch.nn.LayerNorm)):
        config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2, normalization=normalization,
                                   tensor_model_parallel_size=2, sequence_parallel=sequence_parallel)
        norm = TorchNorm(config=config, hidden_size=8, eps=1e-6)
        assert type(norm) is cls and norm.eps == 1e-6 and norm.normalized_shape == (8,)
        assert [p.sequence_parallel for p in norm.parameters()] == [sequence_parallel] * len(list(norm.parameters()))


def test_sdpa_spec_is_the_local_spec_with_sdpa_core_attention():
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from llamapro_megatron.runtime import gpt_layer_spec
    from llamapro_megatron.runtime.sdpa import SDPAttention

    local, sdpa = gpt_layer_spec("local"), gpt_layer_spec("sdpa")
    assert local.submodules.self_attention.submodules.core_attention is DotProductAttention
    assert sdpa.submodules.self_attention.submodules.core_attention is SDPAttention
    # everything else (norms, projections, MLP, checkpoint key map) is the local spec's
    sdpa.submodules.self_attention.submodules.core_attention = DotProductAttention
    assert _spec_tree(sdpa) == _spec_tree(local)


def _spec_tree(spec):
    """A spec as comparable values: megatron-core 0.19 builds the MLP submodule as a fresh functools.partial per
    spec, which compares by identity."""
    import dataclasses
    import functools

    if isinstance(spec, functools.partial):
        return ("partial", spec.func, tuple(map(_spec_tree, spec.args)),
                tuple(sorted((k, _spec_tree(v)) for k, v in spec.keywords.items())))
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        return (type(spec), tuple((f.name, _spec_tree(getattr(spec, f.name))) for f in dataclasses.fields(spec)))
    if isinstance(spec, dict):
        return tuple(sorted((k, _spec_tree(v)) for k, v in spec.items()))
    return spec


# ---- CPU support and process groups (in this process, world of 1) -------------------------------------------


@pytest.fixture
def dist_world_of_1():
    from llamapro_megatron.runtime import destroy_distributed, init_distributed

    yield init_distributed
    destroy_distributed()


@pytest.mark.skipif("_cuda()")
def test_init_destroy_reinit_in_one_process(dist_world_of_1):
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from llamapro_megatron.runtime import destroy_distributed, init_distributed

    with pytest.raises(UserError, match="not divisible by tp\\*pp = 2\\*1"):
        init_distributed(tp=2)
    with pytest.raises(UserError, match="vpp"):
        init_distributed(vpp=2)
    assert not dist.is_initialized()

    info = init_distributed(tp=1, pp=1, seed=7)
    assert (info.rank, info.world_size, info.tp, info.pp, info.dp, info.vpp) == (0, 1, 1, 1, 1, None)
    assert info.device == torch.device("cpu") and info.is_first_stage and info.is_last_stage
    from llamapro_megatron.runtime.distributed import collective_device

    assert collective_device() == torch.device("cpu")  # gloo reduces CPU tensors
    assert dist.get_backend() == "gloo"
    with pytest.raises(UserError, match="already initialised"):
        init_distributed()
    first = torch.rand(3)

    destroy_distributed()
    assert not dist.is_initialized() and not ps.model_parallel_is_initialized()

    info = init_distributed(tp=1, pp=1, seed=7)
    assert ps.model_parallel_is_initialized() and ps.get_data_parallel_world_size() == 1
    assert torch.equal(torch.rand(3), first)  # seeding is part of init
    dist.all_reduce(torch.ones(1))  # the new group works


@pytest.mark.skipif("_cuda()")
def test_cpu_redirects(dist_world_of_1):
    import torch
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    from llamapro_megatron.runtime import cpu_support_active, enable_cpu_support

    dist_world_of_1()
    assert cpu_support_active() and enable_cpu_support()  # idempotent
    assert torch.cuda.current_device() == torch.device("cpu")
    torch.cuda.synchronize()
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.ones(2).cuda().device.type == "cpu"
    assert torch.ones(2).to("cuda", non_blocking=True).device.type == "cpu"
    assert torch.empty(2, pin_memory=True).device.type == "cpu"
    assert torch.ones(2).type() == "torch.FloatTensor"  # only megatron callers see torch.cuda.* names

    # the tracker's named states live in the CPU RNG: fork() draws from them and restores the default stream
    tracker = get_cuda_rng_tracker()
    before = torch.get_rng_state()
    with tracker.fork():
        a = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before)
    with tracker.fork():
        b = torch.rand(4)
    assert not torch.equal(a, b)  # the tracked state advanced

    # the device-argument mode is per thread: a new thread enters it by calling enable_cpu_support()
    seen: dict = {}

    def in_thread():
        try:
            torch.zeros(1, device="cuda")
            seen["before"] = "ok"
        except (AssertionError, RuntimeError):
            seen["before"] = "refused"
        enable_cpu_support()
        seen["after"] = torch.zeros(1, device="cuda").device.type

    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join()
    assert seen == {"before": "refused", "after": "cpu"}


# ---- checkpoint patches (runtime/dist_ckpt.py) ----------------------------------------------------------------------


def test_unstack_layer_keys_gives_each_layer_its_own_key():
    import torch

    from llamapro_megatron.runtime import prepare, unstack_layer_keys

    prepare()
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
    from megatron.core.transformer.mlp import apply_swiglu_sharded_factory

    prefix = "optimizer.state.exp_avg.decoder."
    # layer 3 of 4 (the prepended axis), TP rank 1 of 2 along the tensor's first axis
    stacked = ShardedTensor.from_rank_offsets(prefix + "layers.mlp.linear_fc2.weight", torch.zeros(6, 8),
                                              (0, 3, 4), (1, 1, 2), prepend_axis_num=1)
    assert stacked.global_shape == (4, 12, 8)
    plain = ShardedTensor.from_rank_offsets(prefix + "final_layernorm.weight", torch.zeros(8))
    numbered = ShardedTensor.from_rank_offsets(prefix + "layers.3.mlp.linear_fc2.weight", torch.zeros(6, 8),
                                               (0, 1, 2))
    obj = ShardedObject(prefix + "layers.extra", object(), (4,), (3,))
    fc1 = ShardedTensor.from_rank_offsets(prefix + "layers.mlp.linear_fc1.weight", torch.zeros(16, 8),
                                          (0, 3, 4), (1, 0, 1), prepend_axis_num=1)
    swiglu = apply_swiglu_sharded_factory(fc1, ((0, 3, 4),))
    sd = {"a": stacked, "b": [plain, numbered], "c": obj, "d": swiglu}

    assert unstack_layer_keys(sd) is sd
    a = sd["a"]
    assert (a.key, a.global_shape, a.global_offset, a.axis_fragmentations, a.prepend_axis_num) == (
        prefix + "layers.3.mlp.linear_fc2.weight", (12, 8), (6, 0), (2, 1), 0)
    assert sd["b"] == [plain, numbered] and sd["c"] is obj
    built = sd["d"].build()  # factories unstack what they build (SwiGLU: the w and v halves)
    assert [(t.key, t.global_shape, t.global_offset, t.prepend_axis_num) for t in built] == [
        (prefix + "layers.3.mlp.linear_fc1.weight", (16, 8), (0, 0), 0),
        (prefix + "layers.3.mlp.linear_fc1.weight", (16, 8), (8, 0), 0),
    ]



@pytest.mark.skipif("_cuda()")
def test_save_writes_its_files_without_forking(dist_world_of_1, tmp_path, monkeypatch):
    """megatron-core 0.16's writer forks a process per file; a fork of a process running threads can hang the save
    for good (dist_ckpt._writer_threads_not_forks). Every file is written, from threads, and loads back equal."""
    import torch
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    from llamapro_megatron.runtime.dist_ckpt import save

    dist_world_of_1(tp=1, pp=1)

    def no_fork():
        raise AssertionError("the checkpoint save forked")

    monkeypatch.setattr(os, "fork", no_fork)
    values = {f"t{i}": torch.randn(64, 8, generator=torch.Generator().manual_seed(i)) for i in range(5)}

    def sharded():
        sd = {k: ShardedTensor.from_rank_offsets(k, v.clone()) for k, v in values.items()}
        sd["rng"] = ShardedObject("rng", {"step": 3}, (1,), (0,))
        return sd

    for _ in range(2):  # the patch is undone after a save and applied again by the next
        out = tmp_path / f"ckpt{_}"
        out.mkdir()
        save(sharded(), str(out))
    written = sorted(f.name for f in out.glob("*.distcp"))
    assert written  # 0.16 splits this save over 2 files (a thread each here), 0.19 writes 1
    template = sharded()
    for v in template.values():
        if isinstance(v, ShardedTensor):
            v.data.zero_()
    loaded = dist_checkpointing.load(template, str(out))
    assert all(torch.equal(loaded[k], v) for k, v in values.items()) and loaded["rng"] == {"step": 3}


@pytest.mark.parametrize("returns", ["list", "bool"])
def test_partial_rounds_drop_only_the_fill_error(monkeypatch, returns):
    """A round's save tolerates "invalid fill" and nothing else, whether the planner's check returns its errors
    (newer torch) or a bool after logging them (torch 2.11 and older, seen on the GPU machine)."""
    import logging

    import torch.distributed.checkpoint.default_planner as planner

    from llamapro_megatron.runtime.dist_ckpt import partial_saves_allowed

    def old_style(messages):
        def check(global_plan, metadata):
            for m in messages:
                planner.logger.warning("key:%s %s", "w", m)
            return not messages if returns == "bool" else [f"key:w {m}" for m in messages]
        return check

    def valid(outcome):
        return outcome if returns == "bool" else not outcome

    for messages, ok in (([], True), (["invalid fill tensor-volume: 8 chunks-volume: 4"], True),
                         (["has overlapping chunks"], False), (["invalid fill", "out of bounds chunk"], False)):
        monkeypatch.setattr(planner, "_validate_global_plan", old_style(messages))
        with partial_saves_allowed():
            assert valid(planner._validate_global_plan([], None)) is ok, messages
    assert logging.getLogger(planner.__name__).propagate  # restored

@pytest.mark.skipif("_cuda()")
def test_rope_route_installs_removes_and_leaves_cpu_tensors_to_megatron():
    from llamapro_megatron.runtime import prepare

    prepare()
    from megatron.core.models.common.embeddings import rope_utils

    from llamapro_megatron.runtime.rope import set_rope_fusion

    megatron_rope = rope_utils._apply_rotary_pos_emb_bshd
    t, freqs = torch.randn(6, 2, 4, 8), torch.randn(6, 1, 1, 8)
    expected = megatron_rope(t, freqs)
    try:
        assert set_rope_fusion(True) and set_rope_fusion(True)  # idempotent: one route, not a route of a route
        route = rope_utils._apply_rotary_pos_emb_bshd
        assert route is not megatron_rope and route._llamapro_original is megatron_rope
        assert torch.equal(route(t, freqs), expected)  # CPU tensors: megatron's eager function
    finally:
        assert set_rope_fusion(False) is False
    assert rope_utils._apply_rotary_pos_emb_bshd is megatron_rope
