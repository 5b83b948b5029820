"""Work planning for every checkpoint job, torch-free: units, their sizes, their owners, rounds.

A *unit* is the work one worker does at a time: the embedding; the final norm + output layer ("head"); one decoder
layer. Units are balanced over workers by bytes, and a worker's units are cut into rounds that bound its memory.
Conversion, expansion, merge and the direct paths all plan with these functions; sizes come from the stored shapes
of the one tensor description (`mapping`).
"""
from __future__ import annotations

import math

from llamapro_megatron.arch import LlamaArch
from llamapro_megatron.checkpoint import mapping
from llamapro_megatron.expansion import ExpansionPlan

EMBED_UNIT, HEAD_UNIT = "embedding", "head"
ROUND_BYTES = 512 << 20  # per worker and round: bounds a worker's memory whatever the model size


def layer_unit(layer: int) -> str:
    return f"layer{layer}"


def unit_of(mcore_name: str) -> str:
    """The unit of a megatron state-dict name or checkpoint key with a layer number."""
    layer, rel = mapping.split_layer_name(mcore_name)
    if layer is not None:
        return layer_unit(layer)
    return EMBED_UNIT if rel.startswith("embedding.") else HEAD_UNIT


def hf_unit_of(hf_name: str) -> str:
    """The unit of a HF tensor name (an export writes one safetensors shard per unit)."""
    if hf_name.startswith(mapping.HF_LAYER_PREFIX):
        return layer_unit(int(hf_name.split(".")[2]))
    return EMBED_UNIT if hf_name == "model.embed_tokens.weight" else HEAD_UNIT


def unit_names(num_layers: int) -> list[str]:
    """Every unit of a model, in order: embedding, head, layer0, layer1, ..."""
    return [EMBED_UNIT, HEAD_UNIT] + [layer_unit(i) for i in range(num_layers)]


def unit_sizes(arch: LlamaArch, padded_vocab: int, itemsize: int, num_layers: int) -> dict[str, int]:
    """Bytes of every unit, in unit order: embedding, head, layer0, layer1, ..."""
    sizes = dict.fromkeys(unit_names(num_layers), 0)
    for t in mapping.global_tensors(arch, padded_vocab):
        sizes[unit_of(t.name)] += math.prod(t.shape) * itemsize
    per_layer = sum(math.prod(t.shape) for t in mapping.layer_tensors(arch)) * itemsize
    for i in range(num_layers):
        sizes[layer_unit(i)] = per_layer
    return sizes


def source_unit_sizes(arch: LlamaArch, padded_vocab: int, itemsize: int, plan: ExpansionPlan) -> dict[str, int]:
    """Work per *source* unit of an expansion: a source layer weighs as many layers as are written from it."""
    sizes = unit_sizes(arch, padded_vocab, itemsize, plan.source_num_layers)
    for s in range(plan.source_num_layers):
        sizes[layer_unit(s)] *= len(plan.copies_of(s))
    return sizes


def assign_units(units: list[str], sizes: dict[str, int], workers: int) -> dict[str, int]:
    """Greedy largest-first balancing of units over workers by bytes (deterministic)."""
    load = [0] * workers
    owner = {}
    for u in sorted(units, key=lambda u: (-sizes[u], units.index(u))):
        w = min(range(workers), key=lambda i: (load[i], i))
        owner[u] = w
        load[w] += sizes[u]
    return owner


def plan_rounds(units: list[str], sizes: dict[str, int], budget: int) -> list[list[str]]:
    """Split a worker's units, in order, into rounds of at most `budget` bytes (a larger unit goes alone)."""
    rounds, current, used = [], [], 0
    for u in units:
        if current and used + sizes[u] > budget:
            rounds.append(current)
            current, used = [], 0
        current.append(u)
        used += sizes[u]
    if current:
        rounds.append(current)
    return rounds


def worker_rounds(owner: dict[str, int], sizes: dict[str, int], rank: int, world_size: int,
                  budget: int = ROUND_BYTES) -> list[list[str]]:
    """This rank's units in rounds, padded with empty rounds to the world's round count (saves are collective).

    A one-rank world works in a single round: megatron-core turns a ShardedTensor that covers part of a tensor
    into a PyTorch ShardedTensor by attributing the rest to rank (rank + 1) % world_size (`strategies/torch.py`,
    `sharded_tensor_to_torch_sharded_tensor`), which with one rank is itself. :func:`world_size_for` therefore
    asks for two workers when one was asked for and the model does not fit one round.
    """
    if world_size == 1:
        return [list(owner)]
    per_rank = [plan_rounds([u for u in owner if owner[u] == w], sizes, budget) for w in range(world_size)]
    count = max(len(r) for r in per_rank)
    return per_rank[rank] + [[] for _ in range(count - len(per_rank[rank]))]


def world_size_for(workers: int, total_bytes: int, budget: int) -> int:
    """Workers a collective job starts: two instead of one when one rank would have to work in rounds."""
    return 2 if workers == 1 and total_bytes > budget else workers
