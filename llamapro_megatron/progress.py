"""The one progress bar, for work done by threads of one process or by several worker processes.

In one process (`world_size` 1, no directory) updates from any thread go straight to the bar. Across processes,
each worker records how many units it has done in a small file of its own (written atomically) and rank 0 polls the
files from a thread and shows their sum. Works for spawned workers and torchrun ranks on one node (and across nodes
when the output directory is shared, as a checkpoint directory must be).
"""
from __future__ import annotations

import os
import sys
import threading
from pathlib import Path


class SharedProgress:
    def __init__(self, directory: str | Path | None, rank: int, world_size: int, total: int, desc: str,
                 enabled: bool = True, unit: str = "B"):
        if directory is None and world_size != 1:
            raise ValueError("a progress bar shared by several processes needs a directory")
        self.dir = None if directory is None else Path(directory)
        self.rank, self.world_size, self.total = rank, world_size, total
        self.done = 0
        self.enabled = enabled
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None
        if not enabled:
            return
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._write()
        if rank == 0:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=True, unit_divisor=1024,
                             file=sys.stderr, dynamic_ncols=True, mininterval=0.5)
            if self.dir is not None:
                self._thread = threading.Thread(target=self._poll, daemon=True)
                self._thread.start()

    def _write(self) -> None:
        path = self.dir / f"rank{self.rank}"
        tmp = path.with_suffix(f".tmp{threading.get_ident()}")
        tmp.write_text(str(self.done))
        os.replace(tmp, path)

    def _sum(self) -> int:
        if self.dir is None:
            return self.done
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
        """Thread-safe."""
        with self._lock:
            self.done += n
            if not self.enabled:
                return
            if self.dir is not None:
                self._write()
            else:
                self._bar.update(n)

    def close(self) -> None:
        """Call after the world's barrier so the final figure includes every rank."""
        if not self.enabled or self.rank != 0:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._refresh()
        self._bar.close()
