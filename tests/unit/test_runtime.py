"""llamapro_megatron.runtime: spec resolution, launcher failure handling, CPU redirects, init/destroy/re-init."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from llamapro_megatron.errors import UserError
from llamapro_megatron.runtime import WorkerError, inside_launcher, resolve_spec_kind, run_workers

REPO = Path(__file__).resolve().parents[2]


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still accepts signal 0; it is not running
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _wait_for_files(paths: list[Path], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not all(p.exists() and p.read_text() for p in paths):
        assert time.monotonic() < deadline, f"workers did not start: {paths}"
        time.sleep(0.05)


# ---- spec resolution ----------------------------------------------------------------------------------------


@pytest.mark.skipif("_cuda()")
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


def test_sdpa_spec_is_the_local_spec_with_sdpa_core_attention():
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from llamapro_megatron.runtime import gpt_layer_spec
    from llamapro_megatron.runtime.sdpa import SDPAttention

    local, sdpa = gpt_layer_spec("local"), gpt_layer_spec("sdpa")
    assert local.submodules.self_attention.submodules.core_attention is DotProductAttention
    assert sdpa.submodules.self_attention.submodules.core_attention is SDPAttention
    # everything else (norms, projections, MLP, checkpoint key map) is the local spec's
    sdpa.submodules.self_attention.submodules.core_attention = DotProductAttention
    assert sdpa == local


# ---- run_workers ---------------------------------------------------------------------------------------------


def _report_env(tag: str) -> dict:
    keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS", "THP_MEM_ALLOC_ENABLE")
    return {"tag": tag, **{k: os.environ.get(k) for k in keys}, "pid": os.getpid(), "gc": gc.isenabled(),
            "frozen": gc.get_freeze_count(), "megatron": "megatron.core" in sys.modules}


def test_run_workers_returns_values_by_rank_with_launch_env(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    out = run_workers(_report_env, 2, args=("x",), timeout_s=120)
    assert [o["RANK"] for o in out] == ["0", "1"]
    assert [o["LOCAL_RANK"] for o in out] == ["0", "1"]
    assert {o["WORLD_SIZE"] for o in out} == {"2"}
    assert {o["MASTER_ADDR"] for o in out} == {"127.0.0.1"}
    assert len({o["MASTER_PORT"] for o in out}) == 1 and out[0]["MASTER_PORT"].isdigit()
    assert {o["OMP_NUM_THREADS"] for o in out} == {"1"}
    assert {o["THP_MEM_ALLOC_ENABLE"] for o in out} == {"1"}
    assert {o["tag"] for o in out} == {"x"}
    # ranks import torch + megatron-core before the job, then freeze them (runtime.compat.import_frameworks)
    assert all(o["megatron"] and o["gc"] and o["frozen"] > 100_000 for o in out), out
    assert "RANK" not in os.environ and "MASTER_PORT" not in os.environ  # the parent's env is restored
    assert not any(_alive(o["pid"]) for o in out)


def _rendezvous_on_a_held_port() -> dict:
    import socket

    import torch.distributed as dist

    with socket.socket() as probe:  # the launcher bound MASTER_PORT before this rank started: nobody else can
        try:
            probe.bind(("127.0.0.1", int(os.environ["MASTER_PORT"])))
            held = False
        except OSError:
            held = True
    dist.init_process_group("gloo")  # plain env:// as under torchrun: a client of the store rank 0 serves
    total = torch.tensor([dist.get_rank() + 1.0])
    dist.all_reduce(total)
    dist.destroy_process_group()
    return {"held": held, "total": float(total)}


def _slow_exit(marker: str) -> int:
    import atexit

    atexit.register(lambda: (time.sleep(60), Path(marker).write_text("exited")))
    return os.getpid()


def test_run_workers_skip_exits_returns_once_ranks_reported(tmp_path):
    """skip_exits: the values come back without waiting for the ranks' interpreters to exit (here an exit hook
    that would take a minute); the ranks are stopped and reaped before run_workers returns."""
    marker = tmp_path / "exited"
    t0 = time.monotonic()
    pids = run_workers(_slow_exit, 2, args=(str(marker),), skip_exits=True)
    assert time.monotonic() - t0 < 45
    assert not marker.exists() and not any(_alive(pid) for pid in pids)


def test_run_workers_holds_the_rendezvous_port_until_rank_0_serves_on_it():
    """No race between choosing MASTER_PORT and rank 0's store listening on it (a free port that was closed
    again was once taken by other sockets on the GPU machine: EADDRINUSE at rendezvous)."""
    out = run_workers(_rendezvous_on_a_held_port, 2, timeout_s=120)
    assert out == [{"held": True, "total": 3.0}] * 2


def _visible_cuda() -> tuple[str | None, bool]:
    return os.environ.get("CUDA_VISIBLE_DEVICES"), torch.cuda.is_available()


def test_run_workers_env_overrides_and_hides_gpus(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    out = run_workers(_report_env, 2, args=("y",), timeout_s=120, env={"OMP_NUM_THREADS": "2"})
    assert {o["OMP_NUM_THREADS"] for o in out} == {"2"}  # env wins over the inherited value
    assert os.environ["OMP_NUM_THREADS"] == "3"
    # what conversion's run_job passes: the workers see no GPU whatever the host has
    assert run_workers(_visible_cuda, 1, timeout_s=120, env={"CUDA_VISIBLE_DEVICES": ""}) == [("", False)]


def _tensor_of_rank() -> torch.Tensor:
    return torch.full((1000,), float(os.environ["RANK"]))


def test_run_workers_returns_tensors_by_value():
    # torch's default pickling shares tensor storage through file descriptors that vanish with the worker
    out = run_workers(_tensor_of_rank, 2, timeout_s=120)
    assert [t.sum().item() for t in out] == [0.0, 1000.0]


def _fail_on_rank1(tmp: str, mode: str) -> None:
    rank = int(os.environ["RANK"])
    if rank == 0:
        # start a grandchild that would outlive us if teardown did not take the process group
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        Path(tmp, "rank0").write_text(f"{os.getpid()} {child.pid}")
        time.sleep(120)
        return
    _wait_for_files([Path(tmp, "rank0")])
    if mode == "raise":
        raise ValueError("boom from rank 1")
    os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.parametrize("mode", ["raise", "sigkill"])
def test_run_workers_reports_a_failing_rank_and_stops_the_others(tmp_path, mode):
    start = time.monotonic()
    with pytest.raises(WorkerError) as info:
        run_workers(_fail_on_rank1, 2, args=(str(tmp_path), mode), timeout_s=100)
    assert time.monotonic() - start < 60, "run_workers waited for the surviving rank"
    err = info.value
    assert err.rank == 1
    if mode == "raise":
        assert "ValueError: boom from rank 1" in str(err)
        assert "_fail_on_rank1" in err.remote_traceback
    else:
        assert "SIGKILL" in str(err) and err.exitcode == -signal.SIGKILL
    pids = [int(p) for p in (tmp_path / "rank0").read_text().split()]
    assert not any(_alive(pid) for pid in pids), "rank 0 or its child survived"


def _sleep(tmp: str) -> None:
    Path(tmp, f"rank{os.environ['RANK']}").write_text(str(os.getpid()))
    time.sleep(600)  # outlives every timeout below: the test ends it


def test_run_workers_cleans_up_on_keyboard_interrupt(tmp_path):
    # A shell's background job (`cmd &` without job control, as CI harnesses start it) inherits SIGINT ignored,
    # and Python then never installs its KeyboardInterrupt handler: install it for this test.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    files = [tmp_path / "rank0", tmp_path / "rank1"]

    def interrupt_when_started():
        _wait_for_files(files, timeout_s=280)  # generous: a loaded 2-core machine can take a minute to spawn
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt_when_started, daemon=True).start()
    try:
        with pytest.raises(KeyboardInterrupt):
            run_workers(_sleep, 2, args=(str(tmp_path),), timeout_s=300)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert not any(_alive(int(f.read_text())) for f in files)


def test_run_workers_timeout(tmp_path):
    import psutil

    with pytest.raises(WorkerError, match="timed out"):
        run_workers(_sleep, 1, args=(str(tmp_path),), timeout_s=8)
    # the worker may not even have started on a loaded machine; either way nothing of it is left
    if (tmp_path / "rank0").exists():
        assert not _alive(int((tmp_path / "rank0").read_text()))
    left = [p for p in psutil.Process().children(recursive=True)
            if "resource_tracker" not in " ".join(p.cmdline())]  # multiprocessing's own long-lived helper
    assert not left


def test_run_workers_rejects_unpicklable_functions():
    with pytest.raises(UserError, match="picklable"):
        run_workers(lambda: 1, 2)
    with pytest.raises(UserError, match="positive"):
        run_workers(_report_env, 0)


def test_run_workers_inside_a_launch_runs_in_process(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert inside_launcher()
    [value] = run_workers(_report_env, 2, args=("here",))
    assert value["pid"] == os.getpid() and value["RANK"] == "1"
    with pytest.raises(UserError, match="WORLD_SIZE=2"):
        run_workers(_report_env, 4)


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


# ---- import shim for megatron-core 0.19 without triton -------------------------------------------------------


def _fake_megatron(root: Path) -> None:
    ops = root / "megatron" / "core" / "transformer" / "moe" / "ops"
    ops.mkdir(parents=True)
    (root / "megatron" / "core" / "__init__.py").write_text("from .transformer.moe.ops import paged_stash\n")
    for pkg in (ops.parent.parent, ops.parent, ops):
        (pkg / "__init__.py").write_text("")
    (ops / "paged_stash.py").write_text("import triton\nGLOBAL_BLOCK_SIZE = 1024\n")


@pytest.mark.skipif("__import__('importlib').util.find_spec('triton') is not None")
def test_no_triton_shim_lets_megatron_import(tmp_path):
    _fake_megatron(tmp_path)
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        from llamapro_megatron.runtime.compat import install_no_triton_shim
        if sys.argv[1] == "shim":
            assert install_no_triton_shim() is True
            assert install_no_triton_shim() is True  # idempotent
        import megatron.core
        print(megatron.core.__file__, megatron.core.paged_stash.GLOBAL_BLOCK_SIZE)
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    without = subprocess.run([sys.executable, "-c", script, "plain"], capture_output=True, text=True, env=env)
    assert without.returncode != 0 and "No module named 'triton'" in without.stderr
    with_shim = subprocess.run([sys.executable, "-c", script, "shim"], capture_output=True, text=True, env=env)
    assert with_shim.returncode == 0, with_shim.stderr
    assert str(tmp_path) in with_shim.stdout and with_shim.stdout.strip().endswith("1024")
    # the installed megatron-core: a placeholder only if it has paged_stash.py (0.16.1 has not); never imports it
    from llamapro_megatron.runtime.compat import _megatron_core_dir

    needed = (_megatron_core_dir() / "transformer" / "moe" / "ops" / "paged_stash.py").is_file()
    real = subprocess.run(
        [sys.executable, "-c", "from llamapro_megatron.runtime.compat import install_no_triton_shim as s; "
         "import sys; print(s(), 'megatron.core' in sys.modules)"],
        capture_output=True, text=True, env=env)
    assert real.stdout.split() == [str(needed), "False"], real.stderr


# ---- checkpoint keys -----------------------------------------------------------------------------------------


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
