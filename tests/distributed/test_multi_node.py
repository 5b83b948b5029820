"""examples/launch/multi_node.sh as two nodes on this machine: two torchrun agents (one process each, gloo, c10d
rendezvous on 127.0.0.1) run the whole workflow through the script - convert under torchrun, expand, train at PP2
(one stage per node), stop, train on (the relaunch resumes from the latest checkpoint), export - and train at DP2.
Every tensor (weights and optimizer state) equals the single-node run's (single_node.sh, 2 ranks) after the same
steps, bit for bit; each rank writes only its own shards, one process the pointer, metadata and tokenizer; a node
started with another checkpoint directory, layout or code is refused at start, on both nodes."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from tests import cluster_workflow as cw

pytestmark = pytest.mark.slow
ONLY_RANK_0 = ("latest_checkpointed_iteration.txt", "llamapro.json", "checksums.json", "metadata.json")


@pytest.fixture(scope="module")
def runs(launch_inputs, one_node_workflow, tmp_path_factory):
    env, pro = launch_inputs
    root = tmp_path_factory.mktemp("multinode")
    two = cw.audited({**env, "WORK": str(root / "two")}, root / "audit")
    # PP2: 2 of the recipe's 4 steps, then the same command without the stop: it resumes at step 2
    first = cw.two_nodes(two, ["convert", "expand", "train"], TRAIN_ARGS="--train-iters 2")
    second = cw.two_nodes(two, ["train", "export"])
    (root / "one").symlink_to(one_node_workflow)  # the single-node run of the same workflow
    # DP2 from the same expanded checkpoint, one node and two
    dp = {**env, "PP": "1", "PRO": str(pro), "TRAIN_ARGS": "--train-iters 2"}
    cw.two_nodes({**dp, "WORK": str(root / "dp-two")}, ["train"])
    cw.one_node({**dp, "WORK": str(root / "dp-one")}, ["train"])
    return root, first, second


def _trained(root: Path, work: str, iteration: int) -> Path:
    return root / work / "ckpt" / "pro-trained" / f"iter_{iteration:07d}"


def test_pp2_on_two_nodes_equals_one_node_after_a_resume(runs, tmp_path):
    root, first, second = runs
    assert any("pipeline stage" in out for out in first) or any("stage 1:" in out for out in first)
    assert any("resuming from" in out and "iter_0000002" in out for out in second), second[0][-3000:]
    assert (root / "two" / "ckpt" / "pro-trained" / "latest_checkpointed_iteration.txt").read_text() == "4"
    cw.assert_same_tensors(_trained(root, "two", 4), _trained(root, "one", 4), tmp_path)
    cw.assert_same_export(root / "two" / "pro-hf", root / "one" / "pro-hf")


def test_dp2_on_two_nodes_equals_one_node(runs, tmp_path):
    root = runs[0]
    cw.assert_same_tensors(_trained(root, "dp-two", 2), _trained(root, "dp-one", 2), tmp_path)


def test_each_rank_writes_its_own_shards_and_one_process_the_pointer(runs):
    root = runs[0]
    ckpt = root / "two" / "ckpt"
    written = [(rank, pid, path) for rank, pid, path in cw.writes(root / "audit") if ckpt in path.parents]
    assert written
    for rank, _, path in written:
        if path.suffix == ".distcp":  # torch_dist shards: __<global rank>_<n>.distcp
            assert path.name.startswith(f"__{rank}_"), (rank, path)
        elif rank != "0":
            assert ".progress" in path.parts, (rank, path)  # a shared progress bar's per-rank file
    for name in ONLY_RANK_0:
        writers = {(rank, pid) for rank, pid, path in written if path.name.startswith(name)}
        steps = {pid for _, pid in writers}
        assert writers and {rank for rank, _ in writers} == {"0"}, (name, writers)
        assert len(steps) <= 5, (name, writers)  # one process per step (convert, expand, 2 trains, export)
    tokenizer = {rank for rank, _, path in written if "tokenizer" in path.parts}
    assert tokenizer == {"0"}
    assert not list(ckpt.rglob("*.partial")) and not list(ckpt.rglob("*.tmp*"))


@pytest.mark.parametrize("change", ["save", "layout", "code"])
def test_a_node_started_differently_is_refused_on_every_node(launch_inputs, tmp_path, change):
    env, pro = launch_inputs
    env = {**env, "WORK": str(tmp_path / "w"), "PRO": str(pro), "TRAIN_ARGS": "--train-iters 1"}
    odd, odd_script = dict(env), cw.LAUNCH / "multi_node.sh"
    if change == "save":
        odd["TRAINED"] = str(tmp_path / "elsewhere")
    elif change == "layout":
        odd["TRAIN_ARGS"] = "--train-iters 1 --micro-batch-size 1"
    else:  # another checkout: the same scripts, one source file changed
        copy = tmp_path / "checkout"
        for part in ("examples", "llamapro_megatron"):
            shutil.copytree(cw.ROOT / part, copy / part, ignore=shutil.ignore_patterns("__pycache__"))
        with open(copy / "llamapro_megatron" / "train.py", "a") as f:
            f.write("# changed on one node\n")
        odd_script = copy / "examples" / "launch" / "multi_node.sh"
    port = cw.free_port()
    t0 = time.monotonic()
    nodes = [cw.script("multi_node.sh", ["train"], cw.node_env(env, 0, port)),
             cw.script(odd_script, ["train"], cw.node_env(odd, 1, port))]
    outputs = cw.finish(nodes, timeout_s=180)
    assert time.monotonic() - t0 < 120
    expected = {"save": "--save", "layout": "--micro-batch-size", "code": "llamapro-megatron code"}[change]
    for node, out in zip(nodes, outputs):
        assert node.returncode != 0, out[-3000:]
        assert "were not started alike" in out and expected in out, out[-3000:]
    assert not (tmp_path / "w" / "ckpt").exists() and not (tmp_path / "elsewhere").exists()
