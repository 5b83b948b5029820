"""LLaMA Pro's expansion applied directly to Hugging Face weights: the tests' independent reference.

Written from the paper's description, not from the project's code: P blocks in N groups of M; after each group an
identity copy of the group's last block, whose o_proj and down_proj are zero and everything else equal. In an MoE
block every expert's down projection is the MLP's output projection (Mixtral `block_sparse_moe.experts.E.w2`, Qwen3-MoE
`mlp.experts.E.down_proj`); the router and the other projections are copied.
"""
from __future__ import annotations

import re

import torch

# the residual branches' output projections, relative to the layer: attention's, the dense MLP's, each expert's
_ZEROED = re.compile(r"^(self_attn\.o_proj|mlp\.down_proj|block_sparse_moe\.experts\.\d+\.w2|"
                     r"mlp\.experts\.\d+\.down_proj)\.weight$")


def reference_layer_sources(num_layers: int, groups: int | None = None, positions: list[int] | None = None,
                            top: int | None = None, bottom: int | None = None) -> tuple[list[int], set[int]]:
    """(source of every expanded layer, set of new indices)."""
    if groups is not None:
        m = num_layers // groups
        order, new = [], set()
        for g in range(groups):
            order += list(range(g * m, (g + 1) * m))
            new.add(len(order))
            order.append(g * m + m - 1)
        return order, new
    if top is not None:
        return list(range(num_layers)) + [num_layers - 1] * top, set(range(num_layers, num_layers + top))
    if bottom is not None:
        return [0] * bottom + list(range(num_layers)), set(range(bottom))
    total = num_layers + len(positions)
    order, last, nxt = [], 0, 0
    for i in range(total):
        if i in positions:
            order.append(last)
        else:
            order.append(nxt)
            last, nxt = nxt, nxt + 1
    return order, set(positions)


def expand_hf_state_dict(state: dict[str, torch.Tensor], sources: list[int], new: set[int]) -> dict[str, torch.Tensor]:
    out = {k: v for k, v in state.items() if not k.startswith("model.layers.")}
    for i, src in enumerate(sources):
        prefix = f"model.layers.{src}."
        for name, value in state.items():
            if name.startswith(prefix):
                rel = name[len(prefix):]
                zero = i in new and _ZEROED.match(rel) is not None
                out[f"model.layers.{i}.{rel}"] = torch.zeros_like(value) if zero else value
    return out


def assert_same_values(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Equal by value (-0.0 == 0.0) and dtype, same names."""
    assert set(got) == set(expected), sorted(set(got) ^ set(expected))[:6]
    for name, value in expected.items():
        assert got[name].dtype == value.dtype, name
        assert torch.equal(got[name], value), name
