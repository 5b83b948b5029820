"""One progress bar for work shared by several worker processes.

Each worker records how many bytes it has done in a small file of its own (written atomically); rank 0 polls
the files from a thread and shows their sum. Works for spawned workers and torchrun ranks on one node (and
across nodes when the output directory is shared, as a checkpoint directory must be).
"""
from __future__ import annotations

import os
import sys
import threading
from pathlib import Path


class SharedProgress:
    def __init__(self, directory: str | Path, rank: int, world_size: int, total: int, desc: str,
                 enabled: bool = True, unit: str = "B"):
        self.dir = Path(directory)
        self.rank, self.world_size, self.total = rank, world_size, total
        self.done = 0
        self.enabled = enabled
        self._stop = threading.Event()
        self._thread = None
        if not enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        self._write()
        if rank == 0:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=True, unit_divisor=1024,
                             file=sys.stderr, dynamic_ncols=True, mininterval=0.5)
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()

    def _write(self) -> None:
        path = self.dir / f"rank{self.rank}"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(str(self.done))
        os.replace(tmp, path)

    def _sum(self) -> int:
        total = 0
        for r in range(self.world_size):
            try:
                total += int((self.dir / f"rank{r}").read_text() or 0)
            except (OSError, ValueError):
                pass
        return total

    def _poll(self) -> None:
        while not self._stop.wait(0.5):
            self._refresh()

    def _refresh(self) -> None:
        self._bar.n = min(self._sum(), self.total)
        self._bar.refresh()

    def update(self, n: int) -> None:
        self.done += n
        if self.enabled:
            self._write()

    def close(self) -> None:
        """Call after the world's barrier so the final figure includes every rank."""
        if not self.enabled or self.rank != 0:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._refresh()
        self._bar.close()
