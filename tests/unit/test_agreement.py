"""runtime/agreement.py's verdict on what the ranks of a launch report (the launch itself: tests/distributed/
test_multi_node.py, a node started differently)."""
from __future__ import annotations

from llamapro_megatron.runtime.agreement import code_fingerprint, differences, launch_facts


def _report(rank: int, node: int, command: list[str], **facts: str) -> dict:
    return {"facts": {**launch_facts(command), **facts}, "node": str(node), "host": f"host{node}", "rank": str(rank)}


def test_alike_ranks_agree():
    command = ["train", "--save", "ckpt/a", "--tensor-model-parallel-size", "2"]
    assert differences([_report(r, r // 2, command) for r in range(4)]) == ""


def test_a_different_flag_value_is_named_with_its_option_node_and_ranks():
    a = ["train", "--save", "ckpt/a", "--pipeline-model-parallel-size", "2"]
    b = ["train", "--save", "ckpt/b", "--pipeline-model-parallel-size", "2"]
    verdict = differences([_report(0, 0, a), _report(1, 0, a), _report(2, 1, b), _report(3, 1, b)])
    assert verdict.startswith("the nodes of this launch were not started alike, so none of them starts:")
    assert "node 1 on host1 (ranks 2, 3): its command has `--save ckpt/b` where rank 0 has `--save ckpt/a`" in verdict


def test_an_extra_flag_code_and_versions_are_each_named():
    a = ["train", "--save", "s"]
    b = ["train", "--save", "s", "--micro-batch-size", "1"]
    odd = _report(1, 1, b, **{"llamapro-megatron code": "0123456789abcdef", "megatron-core": "0.0.0-other"})
    verdict = differences([_report(0, 0, a), odd])
    assert "`--micro-batch-size 1` where rank 0 has `(nothing)`" in verdict
    assert f"llamapro-megatron code 0123456789abcdef where node 0 on host0 has {code_fingerprint()}" in verdict
    assert "megatron-core 0.0.0-other where node 0 on host0 has" in verdict
    assert len(verdict.splitlines()) == 5  # the headline, one line per difference, the advice
