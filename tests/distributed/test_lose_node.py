"""Losing a node of a two-node training run (examples/launch/multi_node.sh, two torchrun agents of one process each,
gloo, PP2: one pipeline stage per node), after at least one checkpoint:

- SIGKILL of one node (its agent and worker): the other node's processes exit within 60 s; the pointer names the
  last complete checkpoint (its files as recorded), no partial save looks valid, and relaunching both nodes with the
  same command resumes from it, bit-exactly (every tensor equals an uninterrupted run's at the last step);
- SIGTERM of one node under --exit-signal-handler: both nodes save at the same step and exit; the relaunch resumes
  bit-exactly;
- torchrun's --max-restarts: the killed node comes back while the other's agent waits within its restart budget;
  the job resumes from the last checkpoint and finishes without a relaunch of the surviving node, bit-exactly.
"""
from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
import torch

from llamapro_megatron.checkpoint import integrity
from tests import cluster_workflow as cw

pytestmark = pytest.mark.slow
ITERS = 12
# 16 micro batches per step: ~1 s steps on a CPU, so a node can be lost mid-run after its first save
TRAIN_ARGS = f"--train-iters {ITERS} --global-batch-size 32 --save-interval 2"
LOST_WITHIN_S = 60


@pytest.fixture(scope="module")
def settings(launch_inputs):
    env, pro = launch_inputs
    return {**env, "PRO": str(pro), "TRAIN_ARGS": TRAIN_ARGS}


@pytest.fixture(scope="module")
def reference(settings, tmp_path_factory):
    """The uninterrupted run's last checkpoint: every tensor, as torch's DCP reader reads it."""
    root = tmp_path_factory.mktemp("uninterrupted")
    cw.one_node({**settings, "WORK": str(root)}, ["train"])
    return cw.checkpoint_tensors(root / "ckpt" / "pro-trained" / f"iter_{ITERS:07d}", root)


def _save_dir(work: Path) -> Path:
    return work / "ckpt" / "pro-trained"


def _wait_for_checkpoint(save: Path, nodes: list, timeout_s: float = 300) -> int:
    """The first iteration the pointer names (a node that exits before is a failure)."""
    deadline = time.monotonic() + timeout_s
    pointer = save / "latest_checkpointed_iteration.txt"
    while not (pointer.is_file() and pointer.read_text().strip().isdigit()):
        assert time.monotonic() < deadline and all(n.poll() is None for n in nodes), cw.finish(nodes, 5)
        time.sleep(0.05)
    return int(pointer.read_text())


def _assert_pointer_names_a_complete_checkpoint(save: Path) -> int:
    iteration = int((save / "latest_checkpointed_iteration.txt").read_text())
    report = integrity.check(save / f"iter_{iteration:07d}")
    assert report.files > 2 and not report.problems, report.problems
    return iteration


def _assert_resumed_bit_exactly(work: Path, settings: dict, reference: dict, tmp_path: Path, since: int) -> None:
    outputs = cw.two_nodes({**settings, "WORK": str(work)}, ["train"])
    assert any(f"resuming from {_save_dir(work)}/iter_{since:07d}" in out for out in outputs), outputs[0][-3000:]
    tensors = cw.checkpoint_tensors(_save_dir(work) / f"iter_{ITERS:07d}", tmp_path)
    assert set(tensors) == set(reference)
    differ = [k for k in reference if not torch.equal(tensors[k], reference[k])]
    assert not differ, differ[:5]


def test_sigkill_of_a_node_stops_the_other_and_the_relaunch_resumes(settings, reference, tmp_path):
    work = tmp_path / "w"
    port = cw.free_port()
    nodes = [cw.script("multi_node.sh", ["train"], cw.node_env({**settings, "WORK": str(work)}, i, port))
             for i in (0, 1)]
    first = _wait_for_checkpoint(_save_dir(work), nodes)
    cw.kill_node(nodes[1], signal.SIGKILL)
    killed = time.monotonic()
    survivor = cw.finish([nodes[0]], timeout_s=LOST_WITHIN_S + 30)[0]
    assert time.monotonic() - killed < LOST_WITHIN_S, survivor[-3000:]
    assert nodes[0].returncode != 0
    cw.finish([nodes[1]], 10)
    last = _assert_pointer_names_a_complete_checkpoint(_save_dir(work))
    assert first <= last < ITERS, (first, last)
    for partial in _save_dir(work).glob("*.partial"):  # a save the kill interrupted: never what the pointer names
        assert partial.name != f"iter_{last:07d}"
    _assert_resumed_bit_exactly(work, settings, reference, tmp_path, last)


def test_sigterm_with_exit_signal_handler_saves_on_both_nodes_then_exits(settings, reference, tmp_path):
    work = tmp_path / "w"
    env = {**settings, "WORK": str(work), "TRAIN_ARGS": TRAIN_ARGS + " --exit-signal-handler"}
    port = cw.free_port()
    nodes = [cw.script("multi_node.sh", ["train"], cw.node_env(env, i, port)) for i in (0, 1)]
    _wait_for_checkpoint(_save_dir(work), nodes)
    cw.kill_node(nodes[1], signal.SIGTERM)  # as a scheduler stops a job step: every process of the node
    stopped = time.monotonic()
    outputs = cw.finish(nodes, timeout_s=LOST_WITHIN_S + 30)
    assert time.monotonic() - stopped < LOST_WITHIN_S, outputs[0][-3000:]
    # the other node saved with it, then its worker exited as stopped by the signal (143: not finished), so that its
    # agent stops at once rather than wait for the signalled node's agent in torch elastic's exit barrier
    assert "exitcode  : 143" in outputs[0] and nodes[0].returncode != 0, outputs[0][-3000:]
    both = "\n".join(outputs)  # rank 0, which reports, is on either node (c10d assigns the ranks)
    exits = [line for line in both.splitlines() if line.startswith("exiting at step ")]
    assert len(exits) == 1 and "(SIGTERM)" in exits[0], both[-3000:]
    step = int(exits[0].split("exiting at step ")[1].split()[0])
    assert f"saved {_save_dir(work)}/iter_{step:07d}; the same command resumes from it" in both
    assert _assert_pointer_names_a_complete_checkpoint(_save_dir(work)) == step < ITERS
    _assert_resumed_bit_exactly(work, env, reference, tmp_path, step)


def test_max_restarts_resumes_when_the_lost_node_comes_back(settings, reference, tmp_path):
    work = tmp_path / "w"
    port = cw.free_port()
    env = {**settings, "WORK": str(work), "MAX_RESTARTS": "1"}
    nodes = [cw.script("multi_node.sh", ["train"], cw.node_env(env, i, port)) for i in (0, 1)]
    _wait_for_checkpoint(_save_dir(work), nodes)
    cw.kill_node(nodes[1], signal.SIGKILL)
    cw.finish([nodes[1]], 10)
    last = _assert_pointer_names_a_complete_checkpoint(_save_dir(work))
    time.sleep(3)  # the node comes back a while later, after the survivor's agent has begun its restart
    back = cw.script("multi_node.sh", ["train"], cw.node_env(env, 1, port))  # the node's agent, started again
    outputs = cw.finish([nodes[0], back], timeout_s=300)
    assert nodes[0].returncode == 0 and back.returncode == 0, (outputs[0][-3000:], outputs[1][-3000:])
    # the surviving agent saw its worker fail (the lost peer) and started it again, itself never relaunched
    assert "failed (exitcode: 1)" in outputs[0] and outputs[0].count("+ torchrun") == 1, outputs[0][-3000:]
    assert any(f"resuming from {_save_dir(work)}/iter_{last:07d}" in out for out in outputs), outputs[1][-3000:]
    assert _assert_pointer_names_a_complete_checkpoint(_save_dir(work)) == ITERS and last < ITERS
    tensors = cw.checkpoint_tensors(_save_dir(work) / f"iter_{ITERS:07d}", tmp_path)
    differ = [k for k in reference if not torch.equal(tensors[k], reference[k])]
    assert set(tensors) == set(reference) and not differ, differ[:5]
