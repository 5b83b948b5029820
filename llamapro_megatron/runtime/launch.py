"""Run a function on N local ranks, torchrun-style, from plain Python (tests, single-node tools).

Workers are fresh ``spawn`` processes (never forked from a parent that may hold torch/gloo/CUDA state) and are
not daemonic: megatron's dist_checkpointing starts processes of its own (``filesystem_async.py:54,266``) and
daemonic processes may not have children. Each worker leads its own process group, so tearing a worker down
also removes whatever it started. This module imports neither torch nor megatron-core; each rank imports both
before its job (:func:`runtime.compat.import_frameworks`: without the GC's walks over them).
"""

from __future__ import annotations

import contextlib
import faulthandler
import multiprocessing as mp
import os
import pickle
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.connection import Connection, wait
from typing import Any

from ..errors import UserError

_TERM_GRACE_S = 3.0
_POLL_S = 0.2
_STACKS_SIGNAL = signal.SIGUSR1  # a rank (and what it forked) writes every thread's Python stack to its stderr
_STACKS_WAIT_S = 0.5  # per rank


class WorkerError(RuntimeError):
    """A rank failed: it raised (``remote_traceback`` is its traceback text), died, or the launch timed out."""

    def __init__(self, message: str, rank: int | None = None, remote_traceback: str | None = None,
                 exitcode: int | None = None) -> None:
        super().__init__(message)
        self.rank = rank
        self.remote_traceback = remote_traceback
        self.exitcode = exitcode


def inside_launcher() -> bool:
    """True when this process is a rank of a torch.distributed launch (WORLD_SIZE is set, e.g. by torchrun)."""
    return bool(os.environ.get("WORLD_SIZE"))


def debug() -> bool:
    """LLAMAPRO_DEBUG=1: tracebacks for user errors too (ranks print theirs)."""
    return os.environ.get("LLAMAPRO_DEBUG", "0") not in ("", "0")


def current_rank() -> int:
    """This process's rank in a launch (0 outside one)."""
    return int(os.environ.get("RANK", "0"))


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(fn: Callable[..., Any], world_size: int, args: Sequence[Any] = (),
                timeout_s: float | None = None, env: dict[str, str] | None = None,
                skip_exits: bool = False, frameworks: bool = True) -> list[Any]:
    """Call ``fn(*args)`` on ``world_size`` ranks and return the ranks' return values, ordered by rank.

    Outside a launcher, spawns ``world_size`` processes with RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE,
    MASTER_ADDR=127.0.0.1, MASTER_PORT (see below), OMP_NUM_THREADS=1 and THP_MEM_ALLOC_ENABLE=1 (each unless set)
    in their environment, plus ``env`` (which overrides them). As under torchrun, the rendezvous store is
    up before ``fn`` runs and every rank's ``env://`` rendezvous connects to it as a client
    (TORCHELASTIC_USE_AGENT_STORE=True): rank 0's process serves it on a socket this process bound and handed
    over, so no other process can take MASTER_PORT between its choice and its use (a free port that was closed
    again was taken by other sockets on the GPU machine, NCCL's among them).
    ``fn`` must be picklable (a top-level function of an importable module; a script defining it needs an
    ``if __name__ == "__main__":`` guard) and so must ``args`` and the return values.

    ``frameworks=False``: for jobs that need neither torch nor megatron-core (byte copies): the ranks do not import
    them and no rendezvous store is served (``torch.distributed`` is not set up); a rank reads its number from
    :func:`current_rank`.

    ``skip_exits``: return once every rank has reported its value, stopping ranks still exiting instead of waiting
    for their interpreters to finish (~0.3 s for a rank with torch and megatron-core imported); only for jobs whose
    work is complete when ``fn`` returns (nothing left to flush at exit).

    If a rank raises a :class:`~llamapro_megatron.errors.UserError`, all ranks are terminated and that error is raised
    here as it was (the rank prints no traceback unless LLAMAPRO_DEBUG=1). If a rank raises anything else, dies (e.g.
    from a signal) or exits without a result, or ``timeout_s`` passes, all ranks are terminated and
    :class:`WorkerError` is raised (with the rank's traceback text when it raised). On a timeout, ``timeout_s`` or
    the caller's (any exception but a rank's report or KeyboardInterrupt), the ranks still running first write every
    thread's Python stack to their stderr. Every spawned process, and what it started, is gone when this returns or
    raises (KeyboardInterrupt included).

    Inside a launcher (:func:`inside_launcher`), this process already is one rank: ``fn(*args)`` runs here and
    the returned list holds this rank's value only.
    """
    if not isinstance(world_size, int) or world_size < 1:
        raise UserError(f"world_size must be a positive integer, got {world_size!r}")
    args = tuple(args)
    if inside_launcher():
        launched = int(os.environ["WORLD_SIZE"])
        if launched != world_size:
            raise UserError(f"run_workers(world_size={world_size}) inside a launch of WORLD_SIZE={launched}; "
                            "launch the matching number of processes")
        if frameworks:
            from .compat import import_frameworks

            import_frameworks()
        return [fn(*args)]
    try:
        pickle.dumps((fn, args))
    except Exception as exc:
        raise UserError(f"run_workers needs a picklable top-level function and arguments ({exc}); "
                        "spawned processes import fn by its module and name") from exc

    ctx = mp.get_context("spawn")
    # multiprocessing pickles a socket for a spawned child by passing it a duplicate of the descriptor
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    procs: list[mp.process.BaseProcess] = []
    conns: list[Connection] = []
    try:
        for rank in range(world_size):
            recv_end, send_end = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_worker_main,
                               args=(fn, args, rank, send_end, os.getpid(),
                                     listener if rank == 0 and frameworks else None, frameworks),
                               name=f"llamapro-rank{rank}", daemon=False)
            rank_env = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                        "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                        "TORCHELASTIC_USE_AGENT_STORE": "True",  # the store rank 0's _worker_main serves
                        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
                        # PyTorch's CPU allocator madvises transparent huge pages for allocations >= 2 MB: filling a
                        # fresh 1 GiB tensor then took 0.3x the time here (benchmarks/thp_alloc.py; conversion buffers)
                        "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE", "1"), **(env or {})}
            with _environ(rank_env):  # read at interpreter start (e.g. OMP_NUM_THREADS by torch's OpenMP runtime)
                proc.start()
            send_end.close()  # the worker holds the only write end: EOF means it is gone
            procs.append(proc)
            conns.append(recv_end)
        try:
            return _collect(procs, conns, timeout_s, skip_exits)
        except (UserError, KeyboardInterrupt):
            raise
        except WorkerError as e:
            if e.rank is None:  # the launch timed out: say where each rank was
                _dump_stacks(procs)
            raise
        except BaseException:  # the caller gave up waiting (e.g. a test's timeout): say where each rank was
            _dump_stacks(procs)
            raise
    finally:
        listener.close()
        _teardown(procs)
        for conn in conns:
            conn.close()


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _collect(procs: list[mp.process.BaseProcess], conns: list[Connection], timeout_s: float | None,
             skip_exits: bool = False) -> list[Any]:
    n = len(procs)
    results: list[Any] = [None] * n
    reported = [False] * n
    open_conns = set(range(n))
    pending = set(range(n))
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while pending:
        waitables: list[Any] = [conns[r] for r in open_conns] + [procs[r].sentinel for r in pending]
        # Short waits: a sentinel stays open while a forked grandchild holds it, so exits are also polled.
        wait(waitables, timeout=_POLL_S)
        for rank in sorted(pending):
            if rank in open_conns and conns[rank].poll():
                try:
                    status, payload = pickle.loads(conns[rank].recv_bytes())
                except EOFError:  # died without a word
                    open_conns.discard(rank)
                else:
                    open_conns.discard(rank)
                    if status == "user":
                        raise payload  # a rank's UserError, as it was raised (the user's mistake, not a crash)
                    if status == "err":
                        raise WorkerError(f"rank {rank} of {n} raised:\n{payload}", rank=rank, remote_traceback=payload)
                    results[rank], reported[rank] = payload, True
                    if skip_exits:
                        pending.discard(rank)
                        continue
            code = _peek_exitcode(procs[rank])
            if code is None:
                continue
            if reported[rank]:
                pending.discard(rank)
            elif rank not in open_conns or not conns[rank].poll():
                raise WorkerError(f"rank {rank} of {n} {_describe_exit(code)} without reporting a result "
                                  "(see its output above)", rank=rank, exitcode=code)
        if deadline is not None and time.monotonic() > deadline and pending:
            raise WorkerError(f"run_workers timed out after {timeout_s} s; ranks still running: {sorted(pending)}")
    return results


def _peek_exitcode(proc: mp.process.BaseProcess) -> int | None:
    """Exit code (negative: signal) of an exited worker, without reaping it when possible.

    An unreaped worker keeps its pid, hence its process group id, reserved: :func:`_teardown` can then signal the
    group safely to remove anything the worker left behind.
    """
    try:
        info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except (ChildProcessError, AttributeError, OSError):  # already reaped (or no waitid): ask multiprocessing
        return proc.exitcode
    if info is None:
        return None
    return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _dump_stacks(procs: list[mp.process.BaseProcess]) -> None:
    """Ask every rank still running, and the processes it started, for their Python stacks (on their stderr), one
    rank at a time so that their texts do not interleave."""
    for proc in procs:
        if _peek_exitcode(proc) is not None:
            continue
        sys.stderr.write(f"llamapro: {proc.name} (pid {proc.pid}) was still running; its Python stacks:\n")
        sys.stderr.flush()
        try:
            os.killpg(proc.pid, _STACKS_SIGNAL)  # the rank and what it forked (which inherits the handler)
        except (ProcessLookupError, PermissionError):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(proc.pid, _STACKS_SIGNAL)
        time.sleep(_STACKS_WAIT_S)


def _signal_group(proc: mp.process.BaseProcess, sig: int) -> None:
    if proc.pid is None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)  # the worker and everything it started (it leads its own group)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(proc.pid, sig)  # in case it had not called setpgrp yet


def _teardown(procs: list[mp.process.BaseProcess]) -> None:
    """Stop every worker still running (SIGTERM, then SIGKILL), clear their process groups, reap them."""
    running = [p for p in procs if _peek_exitcode(p) is None]
    for proc in running:
        _signal_group(proc, signal.SIGTERM)
    deadline = time.monotonic() + _TERM_GRACE_S
    while running and time.monotonic() < deadline:
        running = [p for p in running if _peek_exitcode(p) is None]
        if running:
            time.sleep(0.05)
    for proc in procs:
        _signal_group(proc, signal.SIGKILL)  # survivors and leftovers of exited (not yet reaped) workers
    for proc in procs:
        proc.join()
        proc.close()


def _watch_parent(parent_pid: int) -> None:
    # If the launching process dies without tearing us down (e.g. SIGKILL), take our process group with us.
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:
            os.killpg(os.getpgrp(), signal.SIGKILL)


_STORE_SERVER: Any = None  # rank 0: the world's rendezvous store, alive as long as the process


def _serve_store(listener: socket.socket) -> None:
    """Serve the world's TCPStore on the launcher's listening socket (what torchrun's agent does for its ranks)."""
    global _STORE_SERVER
    import torch.distributed as dist

    port = listener.getsockname()[1]
    fd = listener.detach()
    os.set_inheritable(fd, False)  # processes this rank starts must not keep the port bound
    _STORE_SERVER = dist.TCPStore("127.0.0.1", port, int(os.environ["WORLD_SIZE"]), is_master=True,
                                  wait_for_workers=False, master_listen_fd=fd)


def _worker_main(fn: Callable[..., Any], args: tuple, rank: int, conn: Connection, parent_pid: int,
                 listener: socket.socket | None, frameworks: bool = True) -> None:
    os.setpgrp()
    faulthandler.register(_STACKS_SIGNAL, file=sys.stderr, all_threads=True)  # see _dump_stacks
    threading.Thread(target=_watch_parent, args=(parent_pid,), name="parent-watch", daemon=True).start()
    try:
        if frameworks:
            from .compat import import_frameworks

            import_frameworks()  # torch + megatron-core, imported without GC walks (faster)
        if listener is not None:
            _serve_store(listener)
        result = fn(*args)
    except UserError as e:  # the user's mistake: the error itself goes to the parent, which reports it once
        if debug():
            sys.stderr.write(f"[rank {rank}] {traceback.format_exc()}")
        with contextlib.suppress(Exception):
            conn.send_bytes(pickle.dumps(("user", e)))
        conn.close()
        sys.exit(1)
    except BaseException:
        text = traceback.format_exc()
        sys.stderr.write(f"[rank {rank}] {text}")
        with contextlib.suppress(Exception):
            conn.send_bytes(pickle.dumps(("err", text)))
        conn.close()
        sys.exit(1)
    try:
        # Plain pickle: tensors travel by value (torch's shared-memory reductions die with the worker).
        conn.send_bytes(pickle.dumps(("ok", result)))
    except Exception:
        text = f"rank {rank} returned a value that cannot be sent back:\n{traceback.format_exc()}"
        conn.send_bytes(pickle.dumps(("err", text)))
        conn.close()
        sys.exit(1)
    conn.close()
