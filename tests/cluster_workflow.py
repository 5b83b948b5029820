"""The whole workflow of examples/launch/ at a tiny scale, for the tests that run the launch scripts as a user's
cluster would (two torchrun agents on this machine, a real SLURM): the inputs, the settings of common.sh, agents
started and stopped as processes, and what the runs wrote."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from llamapro_megatron.runtime.launch import free_port
from tests.data_artifacts import artifact
from tests.tiny_models import make_tiny_hf

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "examples" / "launch"
# small enough that a step takes a fraction of a second on a CPU; a save at every other step
RECIPE = """\
model: {}
optimizer: {lr: 1.0e-3, min_lr: 1.0e-4}
schedule: {micro_batch_size: 2, global_batch_size: 4, seq_length: 32, train_iters: 4, lr_warmup_iters: 1}
data: {split: "90,10,0"}
checkpointing: {save_interval: 2}
logging: {log_interval: 1, eval_interval: 1000, eval_iters: 0}
"""


def make_inputs(root: Path) -> dict[str, str]:
    """A tiny GQA model with the Mistral tokenizer, two corpora and a recipe under `root`; the settings of
    examples/launch/common.sh that use them (WORK is `root/work`, to be set per run)."""
    root.mkdir(parents=True, exist_ok=True)
    hf = make_tiny_hf(root / "hf", "gqa", vocab_size=32000)
    shutil.copy(artifact("tokenizer.model.v1"), hf / "tokenizer.model")
    for name, text in (("math", "Let x be a prime with x^2 = {} mod 7. Then x + {} is even."),
                       ("code", "def f{}(a, b):\n    return a * {} + b\n")):
        lines = [json.dumps({"text": text.format(i, i * 3)}) for i in range(120)]
        (root / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    (root / "recipe.yaml").write_text(RECIPE)
    bin_dir = str(Path(sys.executable).parent)  # torchrun and llamapro of this interpreter
    return {"HF_DIR": str(hf), "RECIPE": str(root / "recipe.yaml"), "NUM_GROUPS": "2", "TP": "1", "PP": "2",
            "MATH_INPUT": str(root / "math.jsonl"), "CODE_INPUT": str(root / "code.jsonl"),
            "PREPROCESS_WORKERS": "1", "GPUS_PER_NODE": "1", "OMP_NUM_THREADS": "1",
            "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "CUDA_VISIBLE_DEVICES": ""}


def script(name: str | Path, steps: list[str], env: dict[str, str]) -> subprocess.Popen:
    """examples/launch/NAME (or the script at a path) with these steps, in its own session (so that a test can
    signal a whole node)."""
    path = name if isinstance(name, Path) else LAUNCH / name
    return subprocess.Popen(["bash", str(path), *steps], env={**os.environ, **env}, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def node_env(env: dict[str, str], node: int, port: int, nnodes: int = 2, **extra: str) -> dict[str, str]:
    return {**env, "NNODES": str(nnodes), "NODE_RANK": str(node), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port), **extra}


def two_nodes(env: dict[str, str], steps: list[str], timeout_s: float = 600, **extra: str) -> list[str]:
    """multi_node.sh on two nodes of one process each (c10d rendezvous on 127.0.0.1); both must succeed. Returns
    each node's output."""
    port = free_port()
    nodes = [script("multi_node.sh", steps, node_env(env, i, port, **extra)) for i in (0, 1)]
    outputs = finish(nodes, timeout_s)
    for i, (node, out) in enumerate(zip(nodes, outputs)):
        assert node.returncode == 0, f"node {i} failed ({node.returncode}):\n{out[-6000:]}"
    return outputs


def finish(nodes: list[subprocess.Popen], timeout_s: float) -> list[str]:
    """Each node's output once all have exited; a node still running after `timeout_s` is killed (and fails)."""
    deadline = time.monotonic() + timeout_s
    outputs = []
    for node in nodes:
        try:
            out, _ = node.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            kill_node(node)
            out, _ = node.communicate()
            out += "\n[killed by the test: timed out]"
        outputs.append(out)
    return outputs


def kill_node(node: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Signal every process of a node: the script, torchrun's agent, its workers (each in a session of its own, as
    torchrun starts them) and what they started; as a machine that dies, or a scheduler stopping a job step."""
    for pid in [node.pid, *descendants(node.pid)]:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc, children first listed after their parent)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def run_node(name: str, steps: list[str], env: dict[str, str], timeout_s: float = 600) -> str:
    """One launch script's run, which must succeed; returns its output."""
    proc = script(name, steps, env)
    out = finish([proc], timeout_s)[0]
    assert proc.returncode == 0, f"{name} {' '.join(steps)} failed ({proc.returncode}):\n{out[-6000:]}"
    return out


def one_node(env: dict[str, str], steps: list[str], timeout_s: float = 600) -> str:
    """single_node.sh with 2 ranks (torchrun --standalone): the reference a multi-node run must equal."""
    return run_node("single_node.sh", steps, {**env, "GPUS": "2"}, timeout_s)


def audited(env: dict[str, str], audit_dir: Path) -> dict[str, str]:
    """`env` whose Python processes log every file they open for writing (tests/write_audit)."""
    audit_dir.mkdir(parents=True, exist_ok=True)
    path = os.pathsep.join(p for p in (str(ROOT / "tests" / "write_audit"), os.environ.get("PYTHONPATH")) if p)
    return {**env, "PYTHONPATH": path, "LLAMAPRO_WRITE_AUDIT": str(audit_dir)}


def writes(audit_dir: Path) -> list[tuple[str, int, Path]]:
    """(rank, pid, path) of every file opened for writing by an audited process."""
    out = []
    for log in audit_dir.glob("*.log"):
        for line in log.read_text().splitlines():
            rank, pid, path = line.split(" ", 2)
            out.append((rank, int(pid), Path(path)))
    return out


def checkpoint_tensors(ckpt_dir: Path, scratch: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a torch_dist training checkpoint (model, optimizer state), read by torch's own DCP reader."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = scratch / f"{ckpt_dir.parent.name}_{ckpt_dir.name}.pt"
    dcp_to_torch_save(str(ckpt_dir), str(out))
    return {k: v for k, v in torch.load(out, weights_only=False).items() if isinstance(v, torch.Tensor)}


def assert_same_tensors(a: Path, b: Path, scratch: Path) -> None:
    """Two training checkpoints hold the same tensors (weights and optimizer state), bit for bit."""
    ta, tb = checkpoint_tensors(a, scratch), checkpoint_tensors(b, scratch)
    assert set(ta) == set(tb) and any(k.startswith("optimizer") for k in ta), sorted(ta)[:5]
    differ = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not differ, differ[:5]


def assert_same_export(a: Path, b: Path) -> None:
    """Two Hugging Face exports hold the same tensors, bit for bit."""
    from safetensors.torch import load_file

    ta, tb = ({k: v for f in sorted(d.glob("*.safetensors")) for k, v in load_file(f).items()} for d in (a, b))
    assert set(ta) == set(tb) and len(ta) > 10, (sorted(ta)[:5], sorted(tb)[:5])
    differ = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not differ, differ[:5]
