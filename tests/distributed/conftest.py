"""Checkpoints of the whole workflow, written once per test run and shared by the tests that damage copies of them
(tests/distributed/test_safe_loading.py, test_bad_inputs.py): never modify them in place."""
from __future__ import annotations

import shutil

import pytest

from tests.data_artifacts import artifact
from tests.distributed.versions import TRAIN, llamapro
from tests.tiny_models import make_tiny_hf


@pytest.fixture(scope="session")
def workflow_checkpoints(tmp_path_factory):
    """hf (tiny GQA model, the Mistral tokenizer), mc (converted), pro (expanded, groups 2), tr (a training save of
    pro, iteration 1), tro (the same as a trainable-only save), trd (the same with the distributed optimizer),
    code.jsonl (an evaluation corpus)."""
    root = tmp_path_factory.mktemp("workflow")
    hf = make_tiny_hf(root / "hf", "gqa", vocab_size=32000)  # the Mistral tokenizer's vocabulary
    shutil.copy(artifact("tokenizer.model.v1"), hf / "tokenizer.model")
    (root / "code.jsonl").write_text('{"text": "def add(a, b):\\n    return a + b\\n"}\n' * 8)
    llamapro("convert", "hf-to-mcore", "--hf-dir", str(hf), "--out", str(root / "mc"), "--no-progress")
    llamapro("expand", "--load", str(root / "mc"), "--out", str(root / "pro"), "--groups", "2", "--no-progress")
    for save, extra in (("tr", []), ("tro", ["--save-trainable-only"]), ("trd", ["--use-distributed-optimizer"])):
        llamapro("train", "--load", str(root / "pro"), "--save", str(root / save), "--train-iters", "1",
                 "--save-interval", "1", *TRAIN, *extra)
    return root


@pytest.fixture(scope="session")
def launch_inputs(tmp_path_factory):
    """The launch scripts' tiny workflow (tests/cluster_workflow.py): the settings of common.sh with the corpora
    tokenized once by the script's own preprocess step (DATA), and `pro`, an expanded checkpoint of the model for
    the tests that only train (not in the settings: a test that converts writes its own)."""
    from tests import cluster_workflow as cw

    root = tmp_path_factory.mktemp("launch")
    env = {**cw.make_inputs(root / "inputs"), "DATA": str(root / "data")}
    cw.run_node("multi_node.sh", ["preprocess"], cw.node_env(env, 0, cw.free_port(), nnodes=1, WORK=str(root)))
    llamapro("convert", "hf-to-mcore", "--hf-dir", env["HF_DIR"], "--out", str(root / "base"), "--no-progress")
    llamapro("expand", "--load", str(root / "base"), "--out", str(root / "pro"), "--groups", "2", "--no-progress")
    return env, root / "pro"


@pytest.fixture(scope="session")
def one_node_workflow(launch_inputs, tmp_path_factory):
    """single_node.sh (2 ranks) through convert, expand, train (the recipe's 4 steps) and export: the run that the
    multi-node ones (torchrun on two agents, SLURM) must equal. Its WORK directory."""
    from tests import cluster_workflow as cw

    work = tmp_path_factory.mktemp("one-node")
    cw.one_node({**launch_inputs[0], "WORK": str(work)}, ["convert", "expand", "train", "export"])
    return work
