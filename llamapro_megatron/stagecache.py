"""Cached stages of a multi-stage command (`llamapro quickstart`, `llamapro study`).

A stage writes its marker (``stages/NAME.json``: its settings key, the finish stamps of the stages it read, its
time and its result) only after its outputs are complete, and a stage without a valid marker starts its outputs
afresh, so nothing half-written looks done and a second run skips what is done. A stage reruns when its key
changed or when a stage it reads reran since it finished; everything downstream of it follows.

The graph maps a stage to (its key: the settings it depends on, the stages whose outputs it reads), in an order
where every stage comes after the stages it reads. `run_in_world` runs stages on every rank of one launch and
records them; `write_jsonl` and the output helpers serve both commands.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path

Graph = dict[str, tuple[dict, tuple[str, ...]]]


class StageCache:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        self.stages = self.root / "stages"

    def path(self, name: str) -> Path:
        return self.root / name

    def marker(self, stage: str) -> Path:
        return self.stages / f"{stage.replace(':', '--')}.json"

    def read(self, stage: str) -> dict | None:
        try:
            return json.loads(self.marker(stage).read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def record(self, graph: Graph, stage: str, seconds: float, result: dict) -> None:
        """The stage's marker, written (atomically) only once its outputs are complete."""
        key, deps = graph[stage]
        record = {"key": key, "deps": {d: self.read(d)["finished"] for d in deps}, "finished": time.time(),
                  "seconds": seconds, "result": result}
        self.stages.mkdir(parents=True, exist_ok=True)
        tmp = self.marker(stage).with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        os.replace(tmp, self.marker(stage))

    def todo(self, graph: Graph) -> list[str]:
        """The stages without a valid marker: none, another key, or a dependency that is not valid (or reran).

        A stale marker is removed, so that it cannot survive its stage's rerun."""
        valid: dict[str, dict] = {}
        todo = []
        for stage, (key, deps) in graph.items():
            record = self.read(stage)
            # json round trip: a key read back has lists where the graph may have tuples
            ok = (isinstance(record, dict) and "finished" in record
                  and record.get("key") == json.loads(json.dumps(key))
                  and all(d in valid and record.get("deps", {}).get(d) == valid[d]["finished"] for d in deps))
            if ok:
                valid[stage] = record
            else:
                todo.append(stage)
                self.marker(stage).unlink(missing_ok=True)
        return todo


def run_in_world(cache: StageCache, graph: Graph, todo: list[str], run_stage: Callable[[str], dict],
                 backend: str | None = None) -> None:
    """Each stage of `todo`, in order, on every rank of this launch; rank 0 records the markers.

    The world's process group is created here so that it outlives every stage (each sets up its own layout).
    `backend`: NCCL when there are GPUs, gloo otherwise, unless given."""
    import torch
    import torch.distributed as dist

    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend)
    rank0 = dist.get_rank() == 0
    quiet_ranks(rank0)
    for stage in todo:
        t0 = time.time()
        result = run_stage(stage)
        dist.barrier()
        if rank0:
            cache.record(graph, stage, time.time() - t0, result)
    dist.destroy_process_group()


def quiet_ranks(rank0: bool) -> None:
    """One readable log: rank 0 prints (every rank does the same stages)."""
    import sys

    if not rank0:
        sys.stdout = open(os.devnull, "w")  # for the life of this worker process
    mute_library_chatter()


def mute_library_chatter() -> None:
    """Deprecation notices and CPU-fallback notes of the libraries say nothing about the run."""
    import warnings

    from llamapro_megatron.runtime.compat import mute_megatron_notes

    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    warnings.filterwarnings("ignore", message="The pad token id in the tokenizer collides")
    mute_megatron_notes()


def write_jsonl(path: Path, texts: Iterable[str]) -> None:
    """{"text": ...} per line, under a temporary name renamed when complete."""
    tmp = path.with_suffix(".partial")
    with open(tmp, "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
