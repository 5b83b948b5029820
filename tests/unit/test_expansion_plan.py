"""Expansion plans and their metadata (no model needed)."""
from __future__ import annotations

import pytest

from llamapro_megatron.errors import UserError
from llamapro_megatron.expansion import (
    at_positions,
    compose,
    describe,
    interleave,
    placement,
    plan_from_args,
    stage_of_layers,
)


def test_paper_plan_llama2_7b():
    plan = interleave(32, 8)
    assert plan.num_layers == 40
    assert list(plan.new_indices) == [4, 9, 14, 19, 24, 29, 34, 39]
    assert [plan.sources[i] for i in plan.new_indices] == [3, 7, 11, 15, 19, 23, 27, 31]
    originals = [plan.sources[i] for i in range(40) if not plan.is_new(i)]
    assert originals == list(range(32))


def test_positions_copy_nearest_original_below():
    plan = at_positions(4, [0, 3, 4, 7])
    # expanded: new(0)<-0, o0, o1, new(3)<-1, new(4)<-1, o2, o3, new(7)<-3
    assert list(plan.sources) == [0, 0, 1, 1, 1, 2, 3, 3]
    assert list(plan.new_indices) == [0, 3, 4, 7]


def test_top_and_bottom():
    top = placement(4, "top", 2)
    assert list(top.sources) == [0, 1, 2, 3, 3, 3] and list(top.new_indices) == [4, 5]
    bottom = placement(4, "bottom", 2)
    assert list(bottom.sources) == [0, 0, 0, 1, 2, 3] and list(bottom.new_indices) == [0, 1]


@pytest.mark.parametrize("kwargs, match", [
    (dict(groups=5), "must divide the 32 source layers"),
    (dict(positions="3,3"), "unique"),
    (dict(positions="40"), "out of range"),
    (dict(positions="a,b"), "comma-separated integers"),
    (dict(where="top"), "--num-new"),
    (dict(where="top", num_new=0), "at least one"),
    (dict(), "exactly one"),
    (dict(groups=8, positions="1"), "exactly one"),
    (dict(num_new=2), r"--num-new 2 goes with --placement \(top or bottom\)"),
    (dict(groups=8, num_new=2), "--num-new 2 goes with --placement, not with --groups"),
])
def test_bad_plans(kwargs, match):
    with pytest.raises(UserError, match=match):
        plan_from_args(32, **kwargs)


def test_compose_second_expansion():
    first = compose(None, interleave(4, 2))  # 4 -> 6, new 2, 5
    assert first["new_layer_indices"] == [2, 5] and first["source_of_new"] == {"2": 1, "5": 3}
    assert first["layer_origins"] == [0, 1, 1, 2, 3, 3]
    second = compose(first, interleave(6, 3))  # 6 -> 9; sources [0,1,+1, 2,3,+3, 4,5,+5]
    assert second["num_layers"] == 9
    # new: this step's copies (2, 5, 8) and the first step's new layers, now at 3 (src 2) and 7 (src 5)
    assert second["new_layer_indices"] == [2, 3, 5, 7, 8]
    assert second["original_num_layers"] == 4 and len(second["history"]) == 2
    assert second["layer_origins"] == [0, 1, 1, 1, 2, 2, 3, 3, 3]


def test_stages_and_description():
    assert stage_of_layers(8, 2) == [0, 0, 0, 0, 1, 1, 1, 1]
    assert stage_of_layers(8, 2, vpp=2) == [0, 0, 1, 1, 0, 0, 1, 1]
    text = describe(interleave(32, 8), pp=2)
    assert "new layer  39 <- copy of source layer  31   (pipeline stage 1)" in text
    assert "stage 0: layers 0..19 (20), new [4, 9, 14, 19]" in text
