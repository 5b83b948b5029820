"""`llamapro train --dry-run`: parameters and memory per GPU of a layout, before any GPU hour is spent.

The model of every distinct rank (pipeline stage x tensor-parallel rank; data-parallel replicas are identical) is
built by megatron-core on the meta device, inside a *fake* process group of the planned world size (torch's
``fake`` backend: real group bookkeeping, no communication), and the freeze policy is applied to it exactly as the
trainer does. So parameter counts are megatron-core's own, per rank; no weight is loaded and nothing is allocated.

Memory per GPU is estimated by `memory.py` (its docstring has the formulas).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

from llamapro_megatron.arch import TRAIN_LAYOUT_FLAGS, layout_world_size
from llamapro_megatron.checkpoint.mcore import CheckpointMeta
from llamapro_megatron.errors import UserError
from llamapro_megatron.training.config import TrainConfig
from llamapro_megatron.training.memory import (
    GIB,
    activation_bytes,
    describe_recompute,
    fp8_weight_bytes,
    setting,
    state_bytes,
    virtual_stages,
)


@dataclass
class RankPlan:
    pp_rank: int
    tp_rank: int
    ranks: list[int]  # the global ranks of this class (one per data-parallel replica)
    layers: list[int]  # global 0-based layers on this rank (every virtual chunk)
    parameters: int
    trainable: int
    weights: int
    gradients: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations


@dataclass
class Plan:
    source: str
    meta: CheckpointMeta
    config: TrainConfig
    world_size: int
    dp: int
    num_microbatches: int
    global_batch_size: int
    model_parameters: int  # as transformers counts them (no vocabulary padding)
    trainable_parameters: int  # likewise
    attention: str
    recompute: str
    ranks: list[RankPlan] = field(default_factory=list)

    def format(self) -> str:
        c, a, p = self.config, self.meta.arch, self.config.parallelism
        new = (self.meta.expansion or {}).get("new_layer_indices") or []
        lines = [
            f"dry run (meta device, fake process group; nothing allocated) of {self.source}",
            f"model: {a.architecture}, {a.num_layers} layers ({len(new)} new: {new}), hidden {a.hidden_size}, "
            # every layer of an MoE model is sparse: its dense FFN size (Qwen3-MoE's intermediate_size) is unused
            + (f"{a.num_experts} experts of FFN {a.moe_ffn_hidden_size}, top {a.moe_topk}" if a.is_moe
               else f"FFN {a.ffn_hidden_size}")
            + f", heads {a.num_attention_heads} / {a.num_query_groups} KV groups, vocabulary "
            f"{a.vocab_size} (padded to {self.meta.padded_vocab_size})",
            f"parameters: {self.model_parameters:,} (as transformers counts them), trainable "
            f"{self.trainable_parameters:,} ({100 * self.trainable_parameters / self.model_parameters:.1f}%, "
            f"--freeze {c.freeze.freeze})",
            f"layout: {self.world_size} GPUs ({_machines(c, self.world_size)}) = TP {p.tensor_model_parallel_size} x "
            f"PP {p.pipeline_model_parallel_size} x DP {self.dp}"
            + (", sequence parallel" if p.sequence_parallel else "")
            + (f", VPP {p.virtual_pipeline_model_parallel_size}" if virtual_stages(c) else "")
            + (f", EP {p.expert_model_parallel_size} (each layer's experts split over "
               f"{p.expert_model_parallel_size} ranks)"
               if p.expert_model_parallel_size > 1 else "")
            + (f", ETP {p.expert_tensor_parallel_size} ("
               + ("each expert whole on one rank" if p.expert_tensor_parallel_size == 1
                  else f"each expert split over {p.expert_tensor_parallel_size} ranks") + ")"
               if p.expert_tensor_parallel_size is not None else "")
            + f"; {'distributed' if p.use_distributed_optimizer else 'plain'} optimizer; "
            f"{'bf16 with fp32 main params' if c.model.bf16 else 'fp32'}"
            + (f", FP8 GEMMs ({c.model.fp8_format}, {c.model.fp8_scaling} scaling)"
               if c.model.fp8_format else ""),
            f"batch: global {self.global_batch_size} = micro {c.schedule.micro_batch_size} x "
            f"{self.num_microbatches} micro batches x DP {self.dp}; sequence {c.schedule.seq_length}; attention "
            f"{self.attention}; recompute {self.recompute}",
            "",
        ]
        peak = max(self.ranks, key=lambda r: r.total)
        unit, scale = ("GiB", GIB) if peak.total >= GIB else ("MiB", 2**20)  # tiny models: MiB, not 0.00 GiB
        lines.append(f"{'stage':>5} {'tp':>3}  {'ranks':<16} {'layers':<14} {'parameters':>14} {'trainable':>14}   "
                     f"{'weights':>8} {'grads':>8} {'optim':>8} {'activ':>8} {'total':>8}  ({unit} per GPU)")

        def size(n: int) -> str:
            return f"{n / scale:>8.2f}"

        for r in self.ranks:
            lines.append(
                f"{r.pp_rank:>5} {r.tp_rank:>3}  {_ranks(r.ranks):<16} {_layers(r.layers):<14} {r.parameters:>14,} "
                f"{r.trainable:>14,}   {size(r.weights)} {size(r.gradients)} {size(r.optimizer)} "
                f"{size(r.activations)} {size(r.total)}")
        lines += ["", f"peak: {peak.total / scale:.1f} {unit} per GPU (stage {peak.pp_rank}, TP rank {peak.tp_rank}), "
                  "plus CUDA context, NCCL buffers and fragmentation (typically 1-3 GiB); formulas: "
                  "llamapro_megatron/training/memory.py"]
        return "\n".join(lines)


def _ranks(ranks: list[int]) -> str:
    return ",".join(map(str, ranks)) if len(ranks) <= 3 else f"{ranks[0]},{ranks[1]},..,{ranks[-1]}"


def _layers(layers: list[int]) -> str:
    if not layers:
        return "-"
    if layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]} ({len(layers)})"
    return f"{len(layers)} (interleaved)"


def _machines(config: TrainConfig, world_size: int) -> str:
    n = config.launch
    nodes, gpus = n.nodes or 1, n.gpus_per_node or 1
    if (n.nodes or n.gpus_per_node) and nodes * gpus == world_size:
        return f"{nodes} node{'s' * (nodes > 1)} x {gpus}"
    return "--world-size"


# ------------------------------------------------------------------ the model to plan
def model_from_checkpoint(load: str, ckpt_step: int | None = None) -> tuple[CheckpointMeta, str]:
    from llamapro_megatron.checkpoint.mcore import read_meta, resolve_checkpoint

    path = resolve_checkpoint(load, ckpt_step)
    return read_meta(path), str(path)


def model_from_hf_config(path: str, groups: int | None, tp: int) -> tuple[CheckpointMeta, str]:
    """The model `llamapro convert hf-to-mcore [--groups N]` would write from this config.json (no weights read)."""
    import json

    from llamapro_megatron.arch import LlamaArch
    from llamapro_megatron.expansion import compose, interleave

    file = Path(path)
    if file.is_dir():
        file = file / "config.json"
    try:
        raw = json.loads(file.read_text())
    except OSError as e:
        raise UserError(f"--hf-config {path}: cannot read it ({e})") from e
    except json.JSONDecodeError as e:
        raise UserError(f"--hf-config {path}: not valid JSON ({e})") from e
    arch = LlamaArch.from_hf_config(raw, source=str(file))
    expansion = None
    if groups is not None:
        plan = interleave(arch.num_layers, groups)
        expansion = compose(None, plan)
        arch = arch.replace(num_layers=plan.num_layers)
    meta = CheckpointMeta(arch=arch, padded_vocab_size=arch.padded_vocab_size(tp), dtype=arch.dtype,
                          layout={"tp": tp}, source={"hf_config": str(file)}, expansion=expansion)
    return meta, f"{file}" + (f" expanded with --groups {groups}" if groups else "")


# --------------------------------------------------------------------- simulation
@contextlib.contextmanager
def fake_world(rank: int, world_size: int, tp: int, pp: int, vpp: int | None, ep: int = 1, etp: int | None = None):
    """megatron-core parallel state for one rank of a world that does not exist (torch's ``fake`` backend)."""
    import torch.distributed as dist

    from llamapro_megatron.runtime import prepare

    prepare()
    from megatron.core import parallel_state as ps

    try:
        from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the "fake" backend
    except ImportError as e:  # pragma: no cover - torch >= 2.4 has it
        raise UserError(f"--dry-run needs torch's fake process group backend ({e})") from e
    if dist.is_initialized():
        raise UserError("--dry-run plans in one process: run it without torchrun")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                     virtual_pipeline_model_parallel_size=vpp, expert_model_parallel_size=ep,
                                     expert_tensor_parallel_size=etp, create_gloo_process_groups=False)
        yield ps
    finally:
        ps.destroy_model_parallel()
        dist.destroy_process_group()


def build_rank_chunks(meta: CheckpointMeta, config: TrainConfig, vpp: int | None):
    """This (simulated or real) rank's model chunks on the meta device with the freeze policy applied."""
    from llamapro_megatron.runtime.model import build_gpt_model
    from llamapro_megatron.training.freeze import apply_freeze
    from llamapro_megatron.training.layout import transformer_overrides
    from llamapro_megatron.training.model import train_dtype

    p = config.parallelism
    # the plan is for the spec the run will use (TE on GPUs unless forced); the local spec builds the same
    # parameters on the meta device
    kind = config.model.spec if config.model.spec in ("local", "sdpa") else "te"
    overrides = transformer_overrides(config, meta.arch, kind)
    for key in [k for k in overrides if k.startswith("fp8")]:  # the local spec has no FP8 (same parameters)
        del overrides[key]
    chunks = [build_gpt_model(meta.arch, meta.padded_vocab_size, dtype=train_dtype(config),
                              tp=p.tensor_model_parallel_size, pp=p.pipeline_model_parallel_size, vpp=vpp,
                              ep=p.expert_model_parallel_size, etp=p.expert_tensor_parallel_size, spec="local",
                              meta_device=True,
                              vp_stage=v if vpp else None, **overrides)
              for v in range(vpp or 1)]
    apply_freeze(chunks, meta, config.freeze)
    return chunks


def make_plan(meta: CheckpointMeta, config: TrainConfig, world_size: int, source: str) -> Plan:
    from llamapro_megatron.training.freeze import decoder_layers, global_layer_index
    from llamapro_megatron.training.layout import check_world_size, resolve_pipeline

    config = resolve_pipeline(config, meta.arch)  # --num-layers-per-virtual-pipeline-stage, uneven end stages
    p, s = config.parallelism, config.schedule
    tp, pp, vpp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, virtual_stages(config)
    ep, etp = p.expert_model_parallel_size, p.expert_tensor_parallel_size
    meta.arch.validate_layout(tp, pp, vpp, first=p.decoder_first_pipeline_num_layers,
                              last=p.decoder_last_pipeline_num_layers, flags=TRAIN_LAYOUT_FLAGS, ep=ep, etp=etp)
    if meta.padded_vocab_size % tp:
        raise UserError(f"--tensor-model-parallel-size {tp} does not divide the padded vocabulary "
                        f"{meta.padded_vocab_size}")
    check_world_size(world_size, p, "--world-size")
    dp = world_size // (tp * pp)
    expert_dp = world_size // ((etp or tp) * ep * pp)  # the ranks that hold the same experts
    global_batch = s.global_batch_size or s.micro_batch_size * dp
    if global_batch % (s.micro_batch_size * dp):
        raise UserError(f"--global-batch-size {global_batch} is not a multiple of --micro-batch-size "
                        f"{s.micro_batch_size} x DP {dp}")
    microbatches = global_batch // (s.micro_batch_size * dp)
    if vpp and microbatches % pp:
        raise UserError(f"the interleaved schedule needs the micro batches ({microbatches}) to be a multiple of "
                        f"--pipeline-model-parallel-size {pp}")
    model_parameters, trainable_parameters = _whole_model_counts(meta, config)
    flash = config.model.spec != "local"
    granularity = setting(config, "recompute_granularity")
    plan = Plan(source, meta, config, world_size, dp, microbatches, global_batch, model_parameters,
                trainable_parameters, "flash (TE / SDPA)" if flash else "unfused (local spec: keeps a*s*s)",
                describe_recompute(config, granularity))
    for pp_rank in range(pp):
        for tp_rank in range(tp):
            rank = tp_rank + tp * dp * pp_rank  # megatron-core's default order tp-cp-ep-dp-pp, DP rank 0
            with fake_world(rank, world_size, tp, pp, vpp, ep, etp) as ps:
                if (ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()) != (tp_rank, pp_rank):
                    raise RuntimeError(f"megatron-core placed rank {rank} elsewhere than tp {tp_rank} pp {pp_rank}")
                chunks = build_rank_chunks(meta, config, vpp)
                params = sum(t.numel() for c in chunks for t in c.parameters())
                trainable = sum(t.numel() for c in chunks for t in c.parameters() if t.requires_grad)
                expert_trainable = sum(t.numel() for c in chunks for n, t in c.named_parameters()
                                       if t.requires_grad and ".mlp.experts." in n)
                layers = [global_layer_index(layer) for c in chunks for layer in decoder_layers(c)]
                activations = activation_bytes(chunks, meta, config, pp_rank, microbatches, flash, granularity)
                fp8_copies = fp8_weight_bytes(chunks, config)
            weights, grads, opt = state_bytes(params, trainable, config, dp, expert_trainable, expert_dp)
            weights += fp8_copies
            plan.ranks.append(RankPlan(pp_rank, tp_rank, [tp_rank + tp * d + tp * dp * pp_rank for d in range(dp)],
                                       sorted(layers), params, trainable, weights, grads, opt, activations))
    return plan


def _whole_model_counts(meta: CheckpointMeta, config: TrainConfig) -> tuple[int, int]:
    """(parameters, trainable) of the whole model at TP1 PP1, less the vocabulary padding rows."""
    from llamapro_megatron.training.freeze import EMBEDDING, OUTPUT

    single = TrainConfig(model=config.model, freeze=config.freeze)
    with fake_world(0, 1, 1, 1, None):
        (chunk,) = build_rank_chunks(meta, single, None)
        total = trainable = 0
        for name, t in chunk.named_parameters():
            n = t.numel()
            if name in (EMBEDDING, OUTPUT):
                n -= (meta.padded_vocab_size - meta.arch.vocab_size) * meta.arch.hidden_size
            total += n
            trainable += n if t.requires_grad else 0
    return total, trainable


# ---------------------------------------------------------------------- the command
def add_dry_run_arguments(parser) -> None:
    g = parser.add_argument_group("dry run (plan a layout: parameters and memory per GPU, no GPU needed)")
    g.add_argument("--dry-run", action="store_true",
                   help="build every distinct rank's model on the meta device and print its parameters, trainable "
                   "parameters and memory (weights, gradients, optimizer states, activations); trains nothing")
    g.add_argument("--world-size", type=int, default=None,
                   help="GPUs to plan for (default: --nnodes x --gpus-per-node, i.e. the recipe's launch section; "
                   "without one: TP x PP (x EP), a single model replica)")
    g.add_argument("--hf-config", default=None, metavar="CONFIG_JSON",
                   help="plan from a Hugging Face config.json (or its directory) instead of the --load checkpoint, "
                   "before converting anything")
    g.add_argument("--groups", type=int, default=None,
                   help="with --hf-config: plan the expansion `llamapro expand --groups N` would make")


def dry_run(config: TrainConfig, world_size: int | None = None, hf_config: str | None = None,
            groups: int | None = None) -> Plan:
    if hf_config is None and groups is not None:
        raise UserError("--groups plans an expansion of --hf-config; a --load checkpoint already records its own")
    if world_size is None:
        n, p = config.launch, config.parallelism
        world_size = ((n.nodes or 1) * (n.gpus_per_node or 1) if n.nodes or n.gpus_per_node
                      else layout_world_size(p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                                             p.expert_model_parallel_size, p.expert_tensor_parallel_size))
    if world_size < 1:
        raise UserError(f"--world-size {world_size}: must be at least 1")
    tp = config.parallelism.tensor_model_parallel_size
    if hf_config is not None:
        if config.freeze.freeze == "llamapro" and groups is None:
            raise UserError(f"--hf-config {hf_config} with --freeze llamapro: give --groups N to plan the "
                            "expansion (or --freeze none to plan full fine-tuning)")
        meta, source = model_from_hf_config(hf_config, groups, tp)
    elif config.checkpointing.load is not None:
        try:
            meta, source = model_from_checkpoint(config.checkpointing.load, config.checkpointing.ckpt_step)
        except UserError as e:  # e.g. a recipe's checkpoint not made yet: planning needs only the architecture
            raise UserError(f"{e} (to plan before converting: --hf-config CONFIG_JSON [--groups N])") from e
    else:
        raise UserError("--dry-run needs the model: --load CHECKPOINT, or --hf-config config.json [--groups N]")
    return make_plan(meta, config, world_size, source)
