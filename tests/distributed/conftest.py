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
