"""Per-file checksums of a Megatron checkpoint: recorded when it is written, checked by `llamapro verify --integrity`.

`checksums.json` beside `llamapro.json` lists every file of the checkpoint directory (its path relative to it, size
and xxh3-64 digest). Every load already checks that each data file is as large as the DCP metadata says
(`load.check_files`, a stat per file); the digests find what sizes cannot, a flipped byte, at the cost of reading
everything once. Writers hash the data files where they are written, in parallel: the direct path's copying
threads each hash the file they just wrote, each rank of a torch_dist save hashes its share
(:func:`gathered_digests`); the small rest (metadata, tokenizer) is hashed when the directory is committed
(:func:`record`). Torch-free at import.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from llamapro_megatron.errors import UserError

CHECKSUMS_FILE = "checksums.json"
ALGORITHM = "xxh3_64"
_BLOCK = 2 << 20  # read size: fewer syscalls than smaller blocks, and still in cache when hashed (measured best)


def digest(path: str | Path, progress: Callable[[int], None] | None = None) -> str:
    """The file's xxh3-64, read in blocks into one reused buffer (the read releases the GIL)."""
    import xxhash

    h = xxhash.xxh3_64()
    buf = bytearray(_BLOCK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
            if progress is not None:
                progress(n)
    return h.hexdigest()


def files_of(ckpt_dir: str | Path) -> list[str]:
    """Every regular file under the checkpoint directory (relative POSIX paths, sorted), but the checksums."""
    root = Path(ckpt_dir)
    out = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            rel = (Path(dirpath) / name).relative_to(root).as_posix()
            if rel != CHECKSUMS_FILE and (Path(dirpath) / name).is_file():
                out.append(rel)
    return sorted(out)


def record(ckpt_dir: str | Path, known: dict[str, str] | None = None) -> None:
    """Write `checksums.json` for the complete checkpoint directory; `known`: digests its writers computed already
    (of files as they are now), the rest are hashed here."""
    root = Path(ckpt_dir)
    known = known or {}
    entries = {}
    for rel in files_of(root):
        path = root / rel
        entries[rel] = {"size": path.stat().st_size, ALGORITHM: known.get(rel) or digest(path)}
    tmp = root / (CHECKSUMS_FILE + ".tmp")
    tmp.write_text(json.dumps({"algorithm": ALGORITHM, "files": entries}, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, root / CHECKSUMS_FILE)


def gathered_digests(ckpt_dir: str | Path) -> dict[str, str]:
    """Collective, after a torch_dist save into `ckpt_dir`: each rank hashes its share of the data files (largest
    first, dealt round robin); every rank returns all the digests."""
    import torch.distributed as dist

    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = {p.name: digest(p) for p in rank_share(ckpt_dir, rank, world)}
    if world == 1:
        return mine
    everyone: list = [None] * world
    dist.all_gather_object(everyone, mine)
    return {name: d for part in everyone for name, d in part.items()}


def rank_share(ckpt_dir: str | Path, rank: int, world: int) -> list[Path]:
    """The data files rank `rank` of `world` hashes after a save: largest first, dealt round robin."""
    files = sorted((p for p in Path(ckpt_dir).glob("*.distcp") if p.is_file()),
                   key=lambda p: (-p.stat().st_size, p.name))
    return files[rank::world]


@dataclass
class Report:
    """What `check` found: the files and bytes it read, and one line per problem (empty: intact)."""

    ckpt_dir: Path
    files: int = 0
    bytes: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def recorded(ckpt_dir: str | Path) -> dict[str, dict]:
    """The checkpoint's `checksums.json` entries; UserError when it has none or it is damaged."""
    path = Path(ckpt_dir) / CHECKSUMS_FILE
    if not path.is_file():
        raise UserError(f"{ckpt_dir} records no checksums ({CHECKSUMS_FILE} is missing: written by another tool or "
                        "by an older llamapro); only the sizes of its data files can be checked, and every load "
                        "does that")
    try:
        data = json.loads(path.read_text())
        if data.get("algorithm") != ALGORITHM:
            raise ValueError(f"algorithm {data.get('algorithm')!r}, not {ALGORITHM}")
        files = data["files"]
        for rel, entry in files.items():
            if (not isinstance(rel, str) or rel.startswith("/") or ".." in Path(rel).parts
                    or not isinstance(entry.get("size"), int) or not isinstance(entry.get(ALGORITHM), str)):
                raise ValueError(f"entry {rel!r}")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{path} is damaged ({e}); the checkpoint's integrity cannot be checked") from None
    return files


def check(ckpt_dir: str | Path, progress: Callable[[int], None] | None = None) -> Report:
    """Every file `checksums.json` lists is there at its size and digest, and no data file is unlisted."""
    root = Path(ckpt_dir)
    files = recorded(root)
    report = Report(root)
    for rel in sorted(set(files_of(root)) - set(files)):
        report.problems.append(f"{rel}: not among the files recorded at save time")
    for rel, entry in sorted(files.items()):
        path = root / rel
        size = path.stat().st_size if path.is_file() else None
        if size != entry["size"]:
            report.problems.append(f"{rel}: missing" if size is None else
                                   f"{rel}: {size} bytes, {entry['size']} recorded at save time")
            if progress is not None:  # not read: the bar still reaches its total
                progress(entry["size"])
            continue
        report.files, report.bytes = report.files + 1, report.bytes + size
        if digest(path, progress) != entry[ALGORITHM]:
            report.problems.append(f"{rel}: contents differ from the checksum recorded at save time")
    return report


def total_bytes(ckpt_dir: str | Path) -> int:
    """What `check` reads (for a progress bar)."""
    return sum(entry["size"] for entry in recorded(ckpt_dir).values())
