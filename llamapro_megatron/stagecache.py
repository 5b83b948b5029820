"""Cached stages of a multi-stage command (`llamapro quickstart`, `llamapro study`).

A stage writes its marker (``stages/NAME.json``: its settings key, the finish stamps of the stages it read, its
time and its result) only after its outputs are complete, and a stage without a valid marker starts its outputs
afresh, so nothing half-written looks done and a second run skips what is done. A stage reruns when its key
changed or when a stage it reads reran since it finished; everything downstream of it follows.

The graph maps a stage to (its key: the settings it depends on, the stages whose outputs it reads), in an order
where every stage comes after the stages it reads.
"""
from __future__ import annotations

import json
import os
import time
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
