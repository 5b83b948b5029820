"""runtime.launch.run_workers: ranks spawned with a launch environment, their values, failures, timeouts and
teardown; and the import shim for megatron-core 0.19 without triton (checked in fresh interpreters)."""

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
from llamapro_megatron.runtime import WorkerError, inside_launcher, run_workers

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


def _user_error_on_rank1() -> None:
    from llamapro_megatron.runtime.safe_load import UnsafeCheckpoint

    if int(os.environ["RANK"]) == 1:
        raise UnsafeCheckpoint("x/.metadata: refused to load posix.system")
    time.sleep(60)


def test_a_ranks_user_error_is_raised_as_itself_without_a_traceback(capfd, monkeypatch):
    """The user's mistake found in a rank (a refused file, a bad flag) reaches the caller as the same error, so the
    CLI prints it once with its exit code; the rank prints no traceback (unless LLAMAPRO_DEBUG=1)."""
    from llamapro_megatron.runtime.safe_load import UnsafeCheckpoint

    monkeypatch.delenv("LLAMAPRO_DEBUG", raising=False)
    with pytest.raises(UnsafeCheckpoint, match="refused to load posix.system") as info:
        run_workers(_user_error_on_rank1, 2, timeout_s=60)
    assert info.value.exit_code == 1
    assert "Traceback" not in capfd.readouterr().err


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


def _interrupted_once_started(tmp_path, sig, handler, raised) -> list[Path]:
    """run_workers of 2 sleeping ranks, interrupted by `sig` (handled by `handler`) once both run; it must raise
    `raised`. Returns the files in which the ranks wrote their pids."""
    previous = signal.signal(sig, handler)
    files = [tmp_path / "rank0", tmp_path / "rank1"]

    def interrupt_when_started():
        _wait_for_files(files, timeout_s=280)  # generous: a loaded 2-core machine can take a minute to spawn
        os.kill(os.getpid(), sig)

    threading.Thread(target=interrupt_when_started, daemon=True).start()
    try:
        with pytest.raises(raised):
            run_workers(_sleep, 2, args=(str(tmp_path),), timeout_s=300)
    finally:
        signal.signal(sig, previous)
    return files


def test_run_workers_cleans_up_on_keyboard_interrupt(tmp_path):
    # A shell's background job (`cmd &` without job control, as CI harnesses start it) inherits SIGINT ignored,
    # and Python then never installs its KeyboardInterrupt handler: install it for this test.
    files = _interrupted_once_started(tmp_path, signal.SIGINT, signal.default_int_handler, KeyboardInterrupt)
    assert not any(_alive(int(f.read_text())) for f in files)


class _GaveUp(Exception):
    pass


def _give_up(signum, frame):
    raise _GaveUp


def test_a_caller_giving_up_gets_the_ranks_stacks_first(tmp_path, capfd):
    # what pytest-timeout does to a hung test: an exception from a signal handler while run_workers waits
    files = _interrupted_once_started(tmp_path, signal.SIGUSR2, _give_up, _GaveUp)
    err = capfd.readouterr().err
    # each rank's threads under its own heading, its main thread in the function it was running
    texts = err.split("llamapro: llamapro-rank")[1:]
    assert [t.split(" ")[0] for t in texts] == ["0", "1"], err
    assert all("was still running; its Python stacks:" in t and "in _sleep" in t for t in texts), err
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
