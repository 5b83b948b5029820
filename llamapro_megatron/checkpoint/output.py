"""An output directory's life: assembled in `OUT.partial`, renamed to OUT only once complete, removed on failure.

Every writer in the project (conversion both ways, expansion, merge, expand-hf, training saves) goes through these
functions, so nothing half-written ever looks like a result. Torch-free at import (the direct paths' parent process
uses it); the collective helpers import torch when called, inside a worker.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from llamapro_megatron.checkpoint import hf as hfio
from llamapro_megatron.checkpoint import integrity
from llamapro_megatron.checkpoint.mcore import LATEST_FILE, META_FILE, RELEASE, TOKENIZER_DIR
from llamapro_megatron.errors import UserError

PARTIAL_SUFFIX = ".partial"
PROGRESS_DIR = ".progress"  # the shared progress bar's per-rank files, inside the partial output


def partial_dir(out: Path) -> Path:
    """Where an output is assembled; renamed to `out` only once complete, so nothing half-written looks valid."""
    return out.with_name(out.name + PARTIAL_SUFFIX)


def check_output(out: str | Path, overwrite: bool, inputs: tuple = ()) -> Path:
    """`out`, refused when it exists (unless `overwrite`) or when it is one of `inputs` or a folder above one
    (:func:`check_not_input`)."""
    out = Path(out)
    check_not_input(out, inputs)
    if out.exists() and not overwrite:
        raise UserError(f"output {out} already exists; pass --overwrite to replace it, or choose another path")
    return out


def check_not_input(out: Path, inputs: tuple) -> None:
    """Refuse an output that is one of `inputs` (None: absent) or a folder above one: the output replaces its path
    whole once written, and the command would destroy what it reads."""
    for given in inputs:
        if given is None:
            continue
        target, source = out.resolve(), Path(given).resolve()
        if target == source or target in source.parents:
            what = "the input" if target == source else "a folder above the input"
            raise UserError(f"output {out} is {what} {given}: writing it would replace what the command reads; "
                            "choose another path")


def start_output(out: Path) -> Path:
    """A clean, empty `OUT.partial`; returns it."""
    tmp = partial_dir(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit_output(tmp: Path, out: Path) -> None:
    """Replace `out` by the completed `tmp` (old output moved aside first, removed after the rename)."""
    shutil.rmtree(tmp / PROGRESS_DIR, ignore_errors=True)
    trash = None
    if out.exists():
        trash = out.with_name(out.name + f".old-{os.getpid()}")
        out.rename(trash)
    tmp.rename(out)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def make_durable(tree: Path) -> None:
    """fsync every file and directory under `tree` and the directory holding it: a pointer written after this names
    data that survive a crash of this machine (on shared storage, data this client wrote or, already fsynced by their
    writers, the others did; megatron-core fsyncs its shards, not its metadata or common state)."""
    for path in [*sorted(p for p in tree.rglob("*") if p.is_file()), *sorted(p for p in tree.rglob("*") if p.is_dir()),
                 tree, tree.parent]:
        fsync_path(path)


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, text: str) -> None:
    """Replace `path` by `text` atomically and durably (a reader sees the old or the new text, also after a crash)."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def failed(out: Path, reason) -> UserError:
    """The one message of a failed write (a crashed worker's traceback is on stderr above it); a worker's UserError
    keeps its kind (and so its exit code)."""
    kind = type(reason) if isinstance(reason, UserError) else UserError
    error = kind(f"writing {out} failed, nothing was written there: {reason}")
    error.failed_output = Path(out)  # already says so: not wrapped again on its way out (removed_on_failure)
    return error


def last_line(error) -> str:
    """The last line of a worker's traceback (`runtime.launch.WorkerError`): the exception and its message."""
    lines = (error.remote_traceback or str(error)).strip().splitlines()
    return lines[-1] if lines else str(error)


@contextlib.contextmanager
def removed_on_failure(tmp: Path, out: Path) -> Iterator[None]:
    """Remove the partial output `tmp` on any failure; a failed write (disk full, ...) becomes one clear error."""
    try:
        yield
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise failed(out, str(e)) from e
    except UserError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if getattr(e, "failed_output", None) == Path(out):
            raise
        raise failed(out, e) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ------------------------------------------------------------------ releases
def release_common(meta_json: str) -> dict:
    """The non-sharded part of a converted (release) checkpoint, as megatron-core saves it in common.pt."""
    return {"checkpoint_version": 3.0, "iteration": 0, "llamapro": json.loads(meta_json)}


def commit_release(tmp: Path, out: Path, meta_json: str, tokenizer_src: Path,
                   digests: dict[str, str] | None = None) -> None:
    """Once the torch_dist files are in `tmp/release`: metadata, tokenizer, checksums (`digests`: of the data files,
    computed by their writers) and latest pointer; rename to `out`."""
    (tmp / RELEASE / META_FILE).write_text(meta_json)
    hfio.copy_tokenizer_files(tokenizer_src, tmp / RELEASE / TOKENIZER_DIR)
    integrity.record(tmp / RELEASE, digests)
    (tmp / LATEST_FILE).write_text(RELEASE)
    commit_output(tmp, out)


# ------------------------------------------------------------------ worker jobs
def require_workers(workers: int) -> None:
    if workers < 1:
        raise UserError(f"--workers {workers}: need at least 1")


def run_job(worker, job, workers: int, out: Path, total_bytes: int = 0) -> None:
    """Run a worker function on this launch's ranks (torchrun) or on `workers` spawned processes (two when one was
    asked for and `total_bytes` exceed the job's round: `units.world_size_for`).

    If any worker fails, the partial output is removed and the failure is reported as one message (each
    worker's traceback is on stderr): nothing half-written is left that looks like a result.
    """
    from llamapro_megatron.checkpoint.units import world_size_for
    from llamapro_megatron.runtime.launch import WorkerError, inside_launcher, run_workers

    require_workers(workers)
    if inside_launcher():
        worker(job)
        return
    workers = world_size_for(workers, total_bytes, job.round_bytes)
    try:
        # Conversion is host work: spawned workers see no GPU, so any number of them runs on a box of any GPU count
        # (NCCL would pin worker i to GPU i) and a training job's GPUs stay untouched.
        run_workers(worker, workers, args=(job,), env={"CUDA_VISIBLE_DEVICES": ""})
    except WorkerError as e:
        shutil.rmtree(partial_dir(out), ignore_errors=True)
        raise failed(out, last_line(e)) from e
    except UserError as e:  # a worker's (bad input found while reading it)
        shutil.rmtree(partial_dir(out), ignore_errors=True)
        raise failed(out, e) from e


def start_release_world(out: Path):
    """Collective: every worker joins the TP=1 PP=1 world; rank 0 starts a clean `OUT.partial/release`."""
    import torch.distributed as dist

    from llamapro_megatron.runtime.distributed import init_distributed

    info = init_distributed(tp=1, pp=1)  # prepares megatron-core: import it only after this
    tmp = partial_dir(out)
    if info.rank == 0:
        start_output(out)
        (tmp / RELEASE).mkdir()
    dist.barrier()
    return info, tmp


def finish_release_world(info, tmp: Path, out: Path, meta_json: str, tokenizer_src: Path) -> None:
    """Collective, after the save: the ranks hash the data files, rank 0 commits the release
    (:func:`commit_release`); the world is torn down."""
    import torch.distributed as dist

    from llamapro_megatron.runtime.distributed import destroy_distributed

    dist.barrier()
    digests = integrity.gathered_digests(tmp / RELEASE)
    if info.rank == 0:
        commit_release(tmp, out, meta_json, tokenizer_src, digests)
    dist.barrier()
    destroy_distributed()
