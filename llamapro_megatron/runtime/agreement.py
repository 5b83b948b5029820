"""Every node of a launch runs the same command with the same code, or none of them starts.

A multi-node job is started by hand on each node (or by a scheduler from each node's environment): a node whose
command names another checkpoint directory or layout, or that runs another version of this code or of its
frameworks, would otherwise hang in a collective or, worse, write a checkpoint that mixes the two. Before any work
each rank publishes what it runs in the launch's rendezvous store (torchrun's agent store, or rank 0's under
``srun``): rank 0 compares them all and publishes one verdict, so every rank refuses together, naming the
difference and the nodes, and no process group (NCCL or gloo) is ever set up for a mismatched world.
"""
from __future__ import annotations

import datetime
import difflib
import hashlib
import importlib.metadata
import json
import os
import shlex
import socket
from pathlib import Path

from ..errors import UserError

_PACKAGE = Path(__file__).resolve().parents[1]
_checks = 0  # checks made by this process: each gets its own keys in the store


def code_fingerprint() -> str:
    """A digest of this package's Python sources (what a node runs, installed or from a checkout)."""
    digest = hashlib.sha256()
    for path in sorted(_PACKAGE.rglob("*.py")):
        digest.update(path.relative_to(_PACKAGE).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def launch_facts(argv: list[str]) -> dict[str, str]:
    """What must be equal on every rank: the command, this code, and the frameworks' versions."""
    facts = {"command": shlex.join(argv), "llamapro-megatron code": code_fingerprint()}
    for dist in ("torch", "megatron-core"):
        try:
            facts[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            facts[dist] = "not installed"
    return facts


def _where() -> dict[str, str]:
    # GROUP_RANK: torchrun's node rank; SLURM_NODEID: the node under srun
    node = os.environ.get("GROUP_RANK") or os.environ.get("SLURM_NODEID") or "?"
    return {"node": node, "host": socket.gethostname(), "rank": os.environ.get("RANK", "0")}


def check_same_launch(argv: list[str], timeout_s: float = 600.0) -> None:
    """Collective over every rank of the launch (WORLD_SIZE set): raise the same UserError on all ranks unless all
    of them run `argv` with equal :func:`launch_facts`. A no-op outside a launch."""
    from .distributed import _env_int, _store

    world = _env_int("WORLD_SIZE")
    if not world or world < 2:
        return
    global _checks
    _checks += 1
    store, rank = _store(world, datetime.timedelta(seconds=timeout_s))
    # One set of keys per round of the launch: torchrun's c10d rendezvous gives each round (a restart after a node is
    # lost) a store of its own on a new port, and a node that comes back has a restart count of 0 where the others
    # count 1, so the count cannot tell the round. Under the static rendezvous the store outlives a restart, whose
    # ranks then also see the previous round's reports: the same agents rerunning the same command, so the same facts.
    prefix = f"llamapro_megatron/launch/{os.environ.get('MASTER_PORT', '')}/{_checks}"
    store.set(f"{prefix}/{rank}", json.dumps({"facts": launch_facts(argv), **_where()}))
    if rank == 0:
        keys = [f"{prefix}/{r}" for r in range(world)]
        store.wait(keys, datetime.timedelta(seconds=timeout_s))
        reports = [json.loads(v) for v in store.multi_get(keys)]
        store.set(f"{prefix}/verdict", differences(reports))
    store.wait([f"{prefix}/verdict"], datetime.timedelta(seconds=timeout_s))
    verdict = store.get(f"{prefix}/verdict").decode()
    if verdict:
        raise UserError(verdict)


def differences(reports: list[dict]) -> str:
    """'' when every rank's facts equal rank 0's; else one message naming each difference, the nodes and hosts."""
    first = reports[0]
    lines = []
    for key in first["facts"]:
        odd = [r for r in reports if r["facts"][key] != first["facts"][key]]
        if not odd:
            continue
        other = odd[0]
        ranks = ", ".join(sorted({r["rank"] for r in odd}, key=int)[:8]) + (" ..." if len(odd) > 8 else "")
        if key == "command":
            change = _command_change(first["facts"][key], other["facts"][key])
        else:
            change = f"{key} {other['facts'][key]} where {_place(first)} has {first['facts'][key]}"
        lines.append(f"  {_place(other)} (ranks {ranks}): {change}")
    if not lines:
        return ""
    return ("the nodes of this launch were not started alike, so none of them starts:\n" + "\n".join(lines)
            + "\nStart every node with the same command, the same code (checkout or image) and the same paths to the "
            "checkpoints and data on storage they all share.")


def _place(report: dict) -> str:
    return f"node {report['node']} on {report['host']}"


def _command_change(mine: str, theirs: str) -> str:
    """The tokens where two command lines differ, each with the option it belongs to."""
    a, b = shlex.split(mine), shlex.split(theirs)
    parts = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        if op == "equal":
            continue
        option = a[i1 - 1] + " " if i1 > 0 and a[i1 - 1].startswith("-") and op == "replace" else ""
        parts.append(f"`{option}{shlex.join(b[j1:j2]) or '(nothing)'}` where rank 0 has "
                     f"`{option}{shlex.join(a[i1:i2]) or '(nothing)'}`")
    return "its command has " + "; ".join(parts)
