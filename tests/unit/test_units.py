"""checkpoint/units.py: the work plan every checkpoint job shares (units, sizes, owners, rounds)."""
from __future__ import annotations

import math

from llamapro_megatron.arch import LlamaArch
from llamapro_megatron.checkpoint import mapping
from llamapro_megatron.checkpoint.units import (
    plan_rounds,
    unit_names,
    unit_of,
    unit_sizes,
    worker_rounds,
    world_size_for,
)
from tests.unit.test_arch import BASE


def test_rounds_plan():

    sizes = {"a": 5, "b": 5, "c": 20, "d": 1}
    assert plan_rounds(["a", "b", "c", "d"], sizes, 10) == [["a", "b"], ["c"], ["d"]]
    owner = {"a": 0, "b": 1, "c": 0, "d": 0}
    assert worker_rounds(owner, sizes, 1, 2, budget=10) == [["b"], [], []]  # padded: saves are collective
    assert worker_rounds(owner, sizes, 0, 1, budget=10) == [["a", "b", "c", "d"]]  # one rank: one round


def test_unit_sizes_are_the_stored_bytes():
    """Independent of the description: the bytes of each unit's HF tensors, plus the padded vocabulary rows."""
    arch = LlamaArch.from_hf_config(dict(BASE, hidden_size=24, intermediate_size=10, num_attention_heads=6,
                                         num_key_value_heads=2, vocab_size=50))
    sizes = unit_sizes(arch, 128, 2, 3)
    assert list(sizes) == unit_names(3) == ["embedding", "head", "layer0", "layer1", "layer2"]
    per_layer = sum(math.prod(s) for s in mapping.hf_layer_shapes(arch).values()) * 2
    assert sizes["layer0"] == sizes["layer2"] == per_layer
    assert sizes["embedding"] == 128 * 24 * 2 and sizes["head"] == (24 + 128 * 24) * 2
    assert unit_of("decoder.layers.2.mlp.linear_fc1.weight") == "layer2"
    assert unit_of("output_layer.weight") == unit_of("decoder.final_layernorm.weight") == "head"
    assert world_size_for(1, sum(sizes.values()), budget=100) == 2 and world_size_for(1, 10, budget=100) == 1
