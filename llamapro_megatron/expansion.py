"""LLaMA Pro block expansion: which blocks are added where, and what the checkpoint records about it.

An expansion plan maps every layer of the expanded model to the source layer it is read from; the identity
copies among them keep every weight of their source except the residual branches' output projections
(attention `linear_proj` / `o_proj`, MLP `linear_fc2` / `down_proj`), which are zero, so the expanded model
computes exactly what the original did. (Zeroing the norm instead would also preserve outputs, but then the
block never receives gradient.)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llamapro_megatron.errors import UserError

PLACEMENTS = ("interleave", "top", "bottom")


@dataclass(frozen=True)
class ExpansionPlan:
    sources: tuple[int, ...]  # expanded layer i is read from source layer sources[i]
    new_indices: tuple[int, ...] = ()  # 0-based expanded-model indices of the identity copies

    @classmethod
    def identity(cls, num_layers: int) -> ExpansionPlan:
        return cls(tuple(range(num_layers)))

    @property
    def num_layers(self) -> int:
        return len(self.sources)

    @property
    def source_num_layers(self) -> int:
        return len(self.sources) - len(self.new_indices)

    def is_new(self, layer: int) -> bool:
        return layer in self.new_indices

    def copies_of(self, source: int) -> list[int]:
        """Expanded layers read from one source layer (the original first, then its copies)."""
        return [i for i, s in enumerate(self.sources) if s == source]


def interleave(num_layers: int, groups: int) -> ExpansionPlan:
    """The paper's plan: N groups of M = P/N blocks; after each group, a copy of the group's last block."""
    if groups < 1 or num_layers % groups:
        raise UserError(f"--groups {groups} must divide the {num_layers} source layers; choose one of "
                        f"{[d for d in range(1, num_layers + 1) if num_layers % d == 0]}")
    per_group = num_layers // groups
    sources, new = [], []
    for g in range(groups):
        block = list(range(g * per_group, (g + 1) * per_group))
        sources += block
        new.append(len(sources))
        sources.append(block[-1])
    return ExpansionPlan(tuple(sources), tuple(new))


def at_positions(num_layers: int, positions: list[int]) -> ExpansionPlan:
    """New blocks at these 0-based indices of the expanded model; each copies the nearest original block below it
    (the first block when there is none below)."""
    total = num_layers + len(positions)
    if len(set(positions)) != len(positions):
        raise UserError(f"--positions {positions}: positions must be unique")
    bad = [p for p in positions if p < 0 or p >= total]
    if bad:
        raise UserError(f"--positions {bad} out of range: with {num_layers} source layers and {len(positions)} new "
                        f"ones the expanded model has indices 0..{total - 1}")
    new = set(positions)
    sources, next_original, last_original = [], 0, None
    for i in range(total):
        if i in new:
            sources.append(0 if last_original is None else last_original)
        else:
            sources.append(next_original)
            last_original = next_original
            next_original += 1
    return ExpansionPlan(tuple(sources), tuple(sorted(new)))


def placement(num_layers: int, where: str, num_new: int) -> ExpansionPlan:
    """The paper's ablations: all new blocks on top (copies of the last block) or at the bottom (of the first)."""
    if num_new < 1:
        raise UserError(f"--num-new {num_new}: need at least one new block")
    if where == "top":
        return at_positions(num_layers, list(range(num_layers, num_layers + num_new)))
    if where == "bottom":
        return at_positions(num_layers, list(range(num_new)))
    raise UserError(f"--placement {where!r}: choose top or bottom (or --groups for the interleaved plan)")


def plan_from_args(num_layers: int, groups: int | None = None, positions: str | list[int] | None = None,
                   where: str | None = None, num_new: int | None = None) -> ExpansionPlan:
    """Exactly one of --groups, --positions, --placement (with --num-new)."""
    given = [name for name, v in (("--groups", groups), ("--positions", positions), ("--placement", where))
             if v is not None]
    if not given and num_new is not None:
        raise UserError(f"--num-new {num_new} goes with --placement (top or bottom); or give --groups or "
                        "--positions instead")
    if len(given) != 1:
        raise UserError(f"give exactly one of --groups, --positions, --placement (got {given or 'none'})")
    if num_new is not None and where is None:
        raise UserError(f"--num-new {num_new} goes with --placement, not with {given[0]}")
    if groups is not None:
        return interleave(num_layers, groups)
    if positions is not None:
        if isinstance(positions, str):
            try:
                positions = [int(p) for p in positions.replace(",", " ").split()]
            except ValueError as e:
                raise UserError(f"--positions {positions!r}: expected comma-separated integers") from e
        return at_positions(num_layers, positions)
    if num_new is None:
        raise UserError("--placement needs --num-new K")
    return placement(num_layers, where, num_new)


def stage_of_layers(num_layers: int, pp: int, vpp: int | None = None) -> list[int]:
    """Pipeline rank of each layer under megatron-core's even split (virtual stages interleaved)."""
    chunks = pp * (vpp or 1)
    per_chunk = num_layers // chunks
    return [(i // per_chunk) % pp for i in range(num_layers)]


def describe(plan: ExpansionPlan, pp: int = 1, vpp: int | None = None) -> str:
    stages = stage_of_layers(plan.num_layers, pp, vpp)
    lines = [f"expansion: {plan.source_num_layers} -> {plan.num_layers} layers, {len(plan.new_indices)} new "
             f"(identity copies: attention output and MLP down projections zero)"]
    for i in plan.new_indices:
        lines.append(f"  new layer {i:>3} <- copy of source layer {plan.sources[i]:>3}   (pipeline stage {stages[i]})")
    if pp > 1:
        for s in range(pp):
            layers = [i for i in range(plan.num_layers) if stages[i] == s]
            new = [i for i in layers if plan.is_new(i)]
            lines.append(f"  stage {s}: layers {layers[0]}..{layers[-1]} ({len(layers)}), new {new}")
    return "\n".join(lines)


def compose(previous: dict[str, Any] | None, plan: ExpansionPlan) -> dict[str, Any]:
    """Expansion metadata after applying `plan` to a model that may itself have been expanded.

    new_layer_indices: every layer that is not an original block (copies of copies included) — what trains.
    source_of_new: new index -> the layer of the immediately preceding model it was copied from.
    layer_origins: for every layer, the original (pre-expansion) block it descends from.
    """
    if previous:
        prev_new = set(previous["new_layer_indices"])
        prev_origins = previous["layer_origins"]
        original = previous["original_num_layers"]
        history = list(previous.get("history", []))
    else:
        prev_new, prev_origins = set(), list(range(plan.source_num_layers))
        original, history = plan.source_num_layers, []
    if len(prev_origins) != plan.source_num_layers:
        raise UserError(f"the plan expands {plan.source_num_layers} layers but the checkpoint has "
                        f"{len(prev_origins)}")
    new = sorted(i for i, s in enumerate(plan.sources) if plan.is_new(i) or s in prev_new)
    history.append({"sources": list(plan.sources), "new_indices": list(plan.new_indices)})
    return {
        "original_num_layers": original,
        "num_layers": plan.num_layers,
        "new_layer_indices": new,
        "source_of_new": {str(i): plan.sources[i] for i in plan.new_indices},
        "layer_origins": [prev_origins[s] for s in plan.sources],
        "history": history,
    }
