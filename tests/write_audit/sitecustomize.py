"""On PYTHONPATH (tests/cluster_workflow.py): every file a process opens for writing, logged with the process's rank.

Set LLAMAPRO_WRITE_AUDIT=DIR: each process appends `RANK PID PATH` lines to DIR/<pid>.log (RANK: its launch rank,
"-" for a launcher's agent or a script's own process). Python-level opens only (torch's DCP writers and every
project writer use them)."""
import os
import sys

_DIR = os.environ.get("LLAMAPRO_WRITE_AUDIT")
if _DIR:
    _FD = os.open(os.path.join(_DIR, f"{os.getpid()}.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    _WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def _hook(event, args):
        if event != "open" or not isinstance(args[0], (str, bytes, os.PathLike)):
            return
        path, mode, flags = args
        if (mode and any(c in mode for c in "wax+")) or (not mode and flags & _WRITE):
            line = f"{os.environ.get('RANK', '-')} {os.getpid()} {os.path.abspath(os.fsdecode(path))}\n"
            os.write(_FD, line.encode())

    sys.addaudithook(_hook)
