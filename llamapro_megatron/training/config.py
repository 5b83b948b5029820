"""Training configuration: a few grouped sections, loaded from a YAML recipe and overridden by flags.

A recipe groups settings by section; keys are Megatron-LM's flag names with underscores:

    parallelism: {tensor_model_parallel_size: 4, pipeline_model_parallel_size: 2, use_distributed_optimizer: true}
    optimizer: {lr: 2.0e-4, min_lr: 2.0e-5, weight_decay: 0.1, clip_grad: 1.0}
    schedule: {micro_batch_size: 4, global_batch_size: 1024, seq_length: 4096, train_iters: 19000}
    data: {data_path: [1.0, data/proofpile, 1.5, data/stack_python], split: "969,30,1"}
    checkpointing: {load: ckpt/pro, save: ckpt/pro-trained, save_interval: 500}

The Instruct stage (SFT) reads chat .jsonl files instead of preprocessed corpora:

    data: {sft: true, data_path: [data/corpora/chat/train.jsonl], sft_packing: padded}
    freeze: {freeze: none}

Each line is ``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}``; conversations are
rendered with the tokenizer's chat template (``llamapro_megatron.data.sft``) and the loss is the mean over the
assistant tokens of the global batch (per-token, not per micro batch). ``sft_packing: packed`` puts several
conversations in one sample with a block-diagonal attention mask (the local spec applies it; RoPE positions do
not restart, which attention does not notice since RoPE is relative); ``padded`` gives one conversation per
sample, padded, and needs no mask (any spec).

Flags use Megatron-LM's names (``--tensor-model-parallel-size``) and win over the recipe. The model's
architecture and its expansion are *not* configured here: they come from the checkpoint's metadata.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llamapro_megatron.errors import UserError
from llamapro_megatron.runtime.specs import SPEC_HELP, SPEC_KINDS

FREEZE_POLICIES = ("llamapro", "none", "layers")
RECOMPUTE_GRANULARITIES = ("full", "selective")
RECOMPUTE_METHODS = ("uniform", "block")
DECAY_STYLES = ("cosine", "linear", "constant", "inverse-square-root")
SFT_PACKING = ("packed", "padded")
MOE_DISPATCHERS = ("allgather", "alltoall")
FP8_FORMATS = ("e4m3", "hybrid")  # Megatron-LM's --fp8-format
# Megatron-LM's --fp8-recipe names: delayed scaling, per-tensor current scaling, MX (Blackwell), 128-blocks
FP8_RECIPES = ("delayed", "tensorwise", "mxfp8", "blockwise")
FP8_AMAX_ALGOS = ("most_recent", "max")


@dataclass(kw_only=True, slots=True)
class ModelSection:
    spec: str = "auto"  # megatron layer spec: te where CUDA + Transformer Engine work, else sdpa
    bf16: bool = False  # bf16 params and activations with fp32 main params in the optimizer
    recompute_granularity: str | None = None  # full: whole layers; selective: the attention core only
    recompute_method: str | None = None  # with full: uniform (groups of N layers) or block (first N per stage)
    recompute_num_layers: int | None = None  # with full: the N of --recompute-method
    no_bias_swiglu_fusion: bool = False  # on CUDA the SwiGLU is one torch.compile'd kernel unless this is set
    no_rope_fusion: bool = False  # on CUDA RoPE is fused (TE's kernel, else torch.compile) unless this is set
    # megatron-core's compiled vocab-parallel cross-entropy for the loss; None: on with CUDA, off on CPU
    cross_entropy_loss_fusion: bool | None = None
    # MoE: the load-balancing loss's coefficient (None: the HF config's router_aux_loss_coef), counted for the
    # routers that train only; the token dispatcher (None: alltoall on CUDA, allgather on CPU)
    moe_aux_loss_coeff: float | None = None
    moe_token_dispatcher_type: str | None = None
    # FP8 GEMMs in the decoder layers (Transformer Engine, TE spec, a GPU with FP8); None: off. The others default,
    # once fp8_format is set, to Megatron-LM's: delayed scaling, amax history 1, most recent amax.
    fp8_format: str | None = None
    fp8_recipe: str | None = None
    fp8_amax_history_len: int | None = None
    fp8_amax_compute_algo: str | None = None

    @property
    def fp8_scaling(self) -> str | None:
        """The FP8 recipe in effect: --fp8-recipe, delayed when only --fp8-format is given; None without FP8."""
        return None if self.fp8_format is None else self.fp8_recipe or "delayed"


@dataclass(kw_only=True, slots=True)
class ParallelismSection:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    expert_model_parallel_size: int = 1  # MoE: each layer's experts split over this many data-parallel ranks
    expert_tensor_parallel_size: int | None = None  # MoE: each expert split over this many ranks (None: TP)
    virtual_pipeline_model_parallel_size: int | None = None  # model chunks per pipeline rank (interleaved)
    num_layers_per_virtual_pipeline_stage: int | None = None  # alternative to the above: layers per chunk
    decoder_first_pipeline_num_layers: int | None = None  # uneven stages: layers on the first stage
    decoder_last_pipeline_num_layers: int | None = None  # ... and on the last; the rest split evenly
    use_distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False  # reduce gradient buckets during the backward pass
    overlap_param_gather: bool = False  # all-gather updated params during the forward (distributed optimizer)
    sequence_parallel: bool = False  # split norms/dropout activations along the sequence over TP
    distributed_timeout_minutes: float = 10.0  # a collective waiting longer fails (e.g. a peer that hangs)


@dataclass(kw_only=True, slots=True)
class OptimizerSection:
    lr: float = 2e-4
    min_lr: float = 0.0
    weight_decay: float = 0.1  # never applied to norms and biases (megatron-core's default param groups)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0


@dataclass(kw_only=True, slots=True)
class ScheduleSection:
    micro_batch_size: int = 1
    global_batch_size: int | None = None  # default: micro batch x data-parallel size (no accumulation)
    seq_length: int = 4096
    train_iters: int | None = None
    train_samples: int | None = None  # alternative to train_iters: iterations = samples / global batch
    lr_warmup_fraction: float | None = None
    lr_warmup_iters: int = 0
    lr_decay_style: str = "cosine"
    lr_decay_iters: int | None = None  # default: train iterations
    exit_duration_in_mins: float | None = None
    exit_signal_handler: bool = False  # on SIGTERM: save a checkpoint and exit


@dataclass(kw_only=True, slots=True)
class DataSection:
    data_path: list[str] = field(default_factory=list)  # "PREFIX" or "W1 PREFIX1 W2 PREFIX2 ..." (Megatron-LM)
    data_weighting: str = "probability"  # or "multiplier" (the paper's per-corpus epochs)
    split: str = "969,30,1"
    data_cache_path: str | None = None
    tokenizer_model: str | None = None  # default: the tokenizer stored with the checkpoint
    mock_data: bool = False  # seeded random tokens instead of a corpus (benchmarks, smoke tests)
    sft: bool = False  # data_path lists chat .jsonl files; the loss counts assistant tokens only
    sft_packing: str = "packed"  # packed: several conversations per sample (block-diagonal attention); padded


@dataclass(kw_only=True, slots=True)
class CheckpointingSection:
    load: str | None = None
    save: str | None = None
    ckpt_step: int | None = None
    save_interval: int | None = None
    keep_last: int | None = None  # keep every checkpoint unless set
    no_load_optim: bool = False
    no_load_rng: bool = False
    finetune: bool = False  # load weights only: iteration 0, fresh optimizer and scheduler
    save_trainable_only: bool = False  # saves hold the trainable tensors; frozen ones stay in the base checkpoint


@dataclass(kw_only=True, slots=True)
class LoggingSection:
    log_interval: int = 10
    eval_interval: int = 1000
    eval_iters: int = 10
    eval_at_start: bool = False  # validate once before the first step (a baseline for the loss curve)
    tensorboard_dir: str | None = None
    peak_tflops: float | None = None  # per device, for MFU (default: known GPUs; none on CPU)


@dataclass(kw_only=True, slots=True)
class FreezeSection:
    freeze: str = "llamapro"  # llamapro: only the expanded blocks train; none: everything; layers: trainable_layers
    trainable_layers: list[int] = field(default_factory=list)  # global 0-based layer indices (freeze: layers)
    train_embeddings: bool = False
    train_output_layer: bool = False
    train_norms: bool = False  # the final norm and every block's norm weights


@dataclass(kw_only=True, slots=True)
class LaunchSection:
    # The machines a recipe is written for. The launcher (torchrun, srun) decides the real world size; these are
    # what `llamapro train --dry-run` plans for when no --world-size is given.
    nodes: int | None = None  # unset: plan for one model replica (TP x PP GPUs)
    gpus_per_node: int | None = None


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    parallelism: ParallelismSection = field(default_factory=ParallelismSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    data: DataSection = field(default_factory=DataSection)
    checkpointing: CheckpointingSection = field(default_factory=CheckpointingSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    freeze: FreezeSection = field(default_factory=FreezeSection)
    launch: LaunchSection = field(default_factory=LaunchSection)
    seed: int = 1234

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SECTION_CLASSES = {
    "model": ModelSection, "parallelism": ParallelismSection, "optimizer": OptimizerSection,
    "schedule": ScheduleSection, "data": DataSection, "checkpointing": CheckpointingSection,
    "logging": LoggingSection, "freeze": FreezeSection, "launch": LaunchSection,
}

# flag -> (section, field, argparse kwargs). The one place where a flag meets its config field.
_BOOL = dict(action="store_true")
FLAGS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "--spec": ("model", "spec", dict(choices=SPEC_KINDS, help=SPEC_HELP)),
    "--bf16": ("model", "bf16", dict(_BOOL, help="bf16 training with fp32 main params")),
    "--fp8-format": ("model", "fp8_format",
                     dict(choices=FP8_FORMATS,
                          help="FP8 GEMMs in the decoder layers through Transformer Engine (needs --bf16, the te spec "
                               "and a GPU with FP8: Hopper or newer): e4m3 everywhere, or hybrid (e4m3 forward, e5m2 "
                               "gradients). Weights, optimizer state and checkpoints stay bf16/fp32; embeddings, "
                               "output layer and attention stay bf16. Frozen blocks compute in FP8 too but never "
                               "change")),
    "--fp8-recipe": ("model", "fp8_recipe",
                     dict(choices=FP8_RECIPES,
                          help="with --fp8-format: how FP8 scales are chosen: delayed (from an amax history; the "
                               "default), tensorwise (current per-tensor scaling), mxfp8 (Blackwell only), blockwise "
                               "(128-element blocks)")),
    "--fp8-amax-history-len": ("model", "fp8_amax_history_len",
                               dict(type=int, help="with --fp8-recipe delayed: steps of amax history (default 1)")),
    "--fp8-amax-compute-algo": ("model", "fp8_amax_compute_algo",
                                dict(choices=FP8_AMAX_ALGOS,
                                     help="with --fp8-recipe delayed: scale from the most recent amax (default) or "
                                          "the history's max")),
    "--tensor-model-parallel-size": ("parallelism", "tensor_model_parallel_size", dict(type=int)),
    "--pipeline-model-parallel-size": ("parallelism", "pipeline_model_parallel_size", dict(type=int)),
    "--expert-model-parallel-size": ("parallelism", "expert_model_parallel_size",
                                     dict(type=int, help="MoE models: split each layer's experts over this many "
                                                         "ranks (it must divide the experts, and EP x ETP x PP the "
                                                         "world size: at the default ETP = TP, EP divides the "
                                                         "data-parallel size)")),
    "--expert-tensor-parallel-size": ("parallelism", "expert_tensor_parallel_size",
                                     dict(type=int, help="MoE models: split each expert's FFN over this many ranks "
                                                         "instead of --tensor-model-parallel-size (default: the "
                                                         "same); the world holds TP x PP and ETP x EP x PP alike")),
    "--moe-aux-loss-coeff": ("model", "moe_aux_loss_coeff",
                             dict(type=float, help="MoE models: coefficient of the load-balancing loss (default: "
                                                   "the model's router_aux_loss_coef; transformers' 0.001 where its "
                                                   "config.json has none). It is megatron-core's per-layer "
                                                   "switch loss, added for the routers that train (the new blocks') "
                                                   "only: a frozen block's router neither moves nor adds a loss "
                                                   "that would pull the new blocks toward balancing it")),
    "--moe-token-dispatcher-type": ("model", "moe_token_dispatcher_type",
                                    dict(choices=MOE_DISPATCHERS,
                                         help="MoE models: how tokens reach their experts' ranks (default: alltoall "
                                              "on CUDA, allgather on CPU, where alltoall needs CUDA streams)")),
    "--virtual-pipeline-model-parallel-size": ("parallelism", "virtual_pipeline_model_parallel_size",
                                               dict(type=int, help="model chunks per pipeline rank")),
    "--num-layers-per-virtual-pipeline-stage": (
        "parallelism", "num_layers_per_virtual_pipeline_stage",
        dict(type=int, help="interleaved schedule: layers per model chunk (alternative to "
                            "--virtual-pipeline-model-parallel-size)")),
    "--decoder-first-pipeline-num-layers": ("parallelism", "decoder_first_pipeline_num_layers",
                                            dict(type=int, help="uneven pipeline: layers on the first stage (the other "
                                                               "stages split the rest evenly)")),
    "--decoder-last-pipeline-num-layers": ("parallelism", "decoder_last_pipeline_num_layers",
                                           dict(type=int, help="uneven pipeline: layers on the last stage (e.g. when "
                                                              "the pipeline size does not divide the layers)")),
    "--use-distributed-optimizer": ("parallelism", "use_distributed_optimizer", _BOOL),
    "--overlap-grad-reduce": ("parallelism", "overlap_grad_reduce",
                              dict(_BOOL, help="reduce gradients bucket by bucket during the backward pass")),
    "--overlap-param-gather": ("parallelism", "overlap_param_gather",
                               dict(_BOOL, help="all-gather updated params during the next forward (needs "
                                                "--use-distributed-optimizer and --overlap-grad-reduce)")),
    "--sequence-parallel": ("parallelism", "sequence_parallel",
                            dict(_BOOL, help="split the norms' and dropouts' activations along the sequence over the "
                                             "tensor-parallel ranks (TP > 1; --seq-length a multiple of TP; any "
                                             "spec). MoE models need it at TP > 1")),
    "--distributed-timeout-minutes": (
        "parallelism", "distributed_timeout_minutes",
        dict(type=float, help="how long a collective or the rendezvous waits for the other ranks before the run "
                              "fails (default 10, as Megatron-LM's); a node that died is usually noticed sooner, "
                              "when its connections close")),
    "--no-bias-swiglu-fusion": ("model", "no_bias_swiglu_fusion",
                                dict(_BOOL, help="on CUDA, run the SwiGLU activation as separate torch ops instead "
                                                 "of megatron-core's fused (torch.compile) kernel")),
    "--no-rope-fusion": ("model", "no_rope_fusion",
                         dict(_BOOL, help="on CUDA, run RoPE as megatron-core's separate torch ops instead of a fused "
                                          "kernel (Transformer Engine's on the te spec, torch.compile's otherwise)")),
    "--cross-entropy-loss-fusion": ("model", "cross_entropy_loss_fusion",
                                    dict(action="store_const", const=True,
                                         help="compute the loss with megatron-core's fused (torch.compile) "
                                              "vocab-parallel cross-entropy, reading the logits in their training "
                                              "dtype, instead of its separate fp32 ops. The default on CUDA; on CPU "
                                              "(off there by default) the first step compiles for ~20 s")),
    "--no-cross-entropy-loss-fusion": ("model", "cross_entropy_loss_fusion",
                                       dict(action="store_const", const=False,
                                            help="on CUDA too, compute the loss with megatron-core's separate fp32 "
                                                 "ops instead of the fused cross-entropy")),
    "--recompute-granularity": ("model", "recompute_granularity",
                                dict(choices=RECOMPUTE_GRANULARITIES,
                                     help="activation recomputation: full layers, or only the attention core")),
    "--recompute-method": ("model", "recompute_method",
                           dict(choices=RECOMPUTE_METHODS, help="with full: uniform groups or the first N layers")),
    "--recompute-num-layers": ("model", "recompute_num_layers",
                               dict(type=int, help="with full: layers per group (uniform) or per stage (block)")),
    "--lr": ("optimizer", "lr", dict(type=float)),
    "--min-lr": ("optimizer", "min_lr", dict(type=float)),
    "--weight-decay": ("optimizer", "weight_decay", dict(type=float)),
    "--adam-beta1": ("optimizer", "adam_beta1", dict(type=float)),
    "--adam-beta2": ("optimizer", "adam_beta2", dict(type=float)),
    "--adam-eps": ("optimizer", "adam_eps", dict(type=float)),
    "--clip-grad": ("optimizer", "clip_grad", dict(type=float)),
    "--micro-batch-size": ("schedule", "micro_batch_size", dict(type=int)),
    "--global-batch-size": ("schedule", "global_batch_size", dict(type=int)),
    "--seq-length": ("schedule", "seq_length", dict(type=int)),
    "--train-iters": ("schedule", "train_iters", dict(type=int)),
    "--train-samples": ("schedule", "train_samples", dict(type=int)),
    "--lr-warmup-fraction": ("schedule", "lr_warmup_fraction", dict(type=float)),
    "--lr-warmup-iters": ("schedule", "lr_warmup_iters", dict(type=int)),
    "--lr-decay-style": ("schedule", "lr_decay_style", dict(choices=DECAY_STYLES)),
    "--lr-decay-iters": ("schedule", "lr_decay_iters", dict(type=int)),
    "--exit-duration-in-mins": ("schedule", "exit_duration_in_mins", dict(type=float)),
    "--exit-signal-handler": ("schedule", "exit_signal_handler", dict(_BOOL, help="save and exit on SIGTERM")),
    "--data-path": ("data", "data_path", dict(nargs="+", help="PREFIX or W1 PREFIX1 W2 PREFIX2 ...")),
    "--data-weighting": ("data", "data_weighting", dict(choices=["probability", "multiplier"])),
    "--split": ("data", "split", dict()),
    "--data-cache-path": ("data", "data_cache_path", dict()),
    "--tokenizer-model": ("data", "tokenizer_model", dict(help="default: the checkpoint's tokenizer")),
    "--mock-data": ("data", "mock_data", dict(_BOOL, help="seeded random tokens (no corpus)")),
    "--sft": ("data", "sft", dict(_BOOL, help="Instruct stage: --data-path lists chat .jsonl files "
                                  "({messages: [{role, content}, ...]} per line); loss over assistant tokens only")),
    "--sft-packing": ("data", "sft_packing", dict(choices=SFT_PACKING, help="packed: several conversations per "
                                                  "sample, attention kept within each (local spec); padded: one "
                                                  "per sample (any spec). Default: packed")),
    "--load": ("checkpointing", "load", dict()),
    "--save": ("checkpointing", "save", dict()),
    "--ckpt-step": ("checkpointing", "ckpt_step", dict(type=int)),
    "--save-interval": ("checkpointing", "save_interval", dict(type=int)),
    "--keep-last": ("checkpointing", "keep_last", dict(type=int, help="keep only the K newest checkpoints")),
    "--no-load-optim": ("checkpointing", "no_load_optim", _BOOL),
    "--no-load-rng": ("checkpointing", "no_load_rng", _BOOL),
    "--finetune": ("checkpointing", "finetune", dict(_BOOL, help="weights only: iteration 0, new optimizer")),
    "--save-trainable-only": ("checkpointing", "save_trainable_only",
                              dict(_BOOL, help="saves hold only the trainable tensors (+ optimizer, scheduler, "
                                   "RNG); frozen ones are read from the base checkpoint, recorded by path and "
                                   "fingerprint. `llamapro merge` writes the full checkpoint")),
    "--log-interval": ("logging", "log_interval", dict(type=int)),
    "--eval-interval": ("logging", "eval_interval", dict(type=int)),
    "--eval-iters": ("logging", "eval_iters", dict(type=int)),
    "--eval-at-start": ("logging", "eval_at_start", dict(_BOOL, help="validate before the first step")),
    "--tensorboard-dir": ("logging", "tensorboard_dir", dict()),
    "--peak-tflops": ("logging", "peak_tflops", dict(type=float, help="per-device peak, for MFU")),
    "--freeze": ("freeze", "freeze", dict(choices=FREEZE_POLICIES)),
    "--trainable-layers": ("freeze", "trainable_layers", dict(type=int, nargs="+",
                                                              help="global 0-based layers (with --freeze layers)")),
    "--train-embeddings": ("freeze", "train_embeddings", _BOOL),
    "--train-output-layer": ("freeze", "train_output_layer", _BOOL),
    "--train-norms": ("freeze", "train_norms", _BOOL),
    "--seed": ("", "seed", dict(type=int)),
    "--nnodes": ("launch", "nodes", dict(type=int, help="nodes the run is planned for (--dry-run)")),
    "--gpus-per-node": ("launch", "gpus_per_node", dict(type=int, help="GPUs per node the run is planned for "
                                                                        "(--dry-run)")),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Every flag of :data:`FLAGS`, plus ``--config``; unset flags stay absent (the recipe's value stands)."""
    parser.add_argument("--config", default=None, help="YAML recipe (optional; flags override it)")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for flag, (section, name, kwargs) in FLAGS.items():
        group = groups.setdefault(section, parser.add_argument_group(section or "general"))
        if kwargs.get("action") is None and "choices" not in kwargs:  # readable usage: --lr LR, not OPTIMIZER.LR
            kwargs = {"metavar": name.upper(), **kwargs}
        group.add_argument(flag, dest=f"{section}.{name}", default=argparse.SUPPRESS, **kwargs)


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None, *,
                plan_only: bool = False) -> TrainConfig:
    """A config from a YAML recipe (or the defaults) with ``{"section.field": value}`` overrides applied.

    ``plan_only``: for ``--dry-run``, which needs neither a checkpoint (it may plan from a Hugging Face config), nor
    data, nor a length of training.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        import yaml

        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as e:
            raise UserError(f"--config {path}: cannot read it ({e})") from e
        except yaml.YAMLError as e:
            raise UserError(f"--config {path}: not valid YAML ({e})") from e
        if not isinstance(raw, dict):
            raise UserError(f"--config {path}: expected a mapping of sections ({', '.join(_SECTION_CLASSES)})")
    config = _from_dict(raw, str(path))
    for dotted, value in (overrides or {}).items():
        section, _, name = dotted.rpartition(".")
        target = getattr(config, section) if section else config
        setattr(target, name, value)
    validate(config, plan_only=plan_only)
    return config


def config_from_args(args: argparse.Namespace, plan_only: bool = False) -> TrainConfig:
    overrides = {k: v for k, v in vars(args).items() if "." in k}
    return load_config(getattr(args, "config", None), overrides, plan_only=plan_only)


def _from_dict(raw: dict[str, Any], source: str) -> TrainConfig:
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "seed":
            kwargs["seed"] = int(value)
            continue
        cls = _SECTION_CLASSES.get(key)
        if cls is None:
            raise UserError(f"--config {source}: unknown section {key!r}; sections: seed, "
                            f"{', '.join(_SECTION_CLASSES)}")
        if not isinstance(value, dict):
            raise UserError(f"--config {source}: section {key!r} must be a mapping")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise UserError(f"--config {source}: unknown keys {unknown} in section {key!r}; known: {sorted(known)}")
        kwargs[key] = cls(**value)
    return TrainConfig(**kwargs)


def validate(config: TrainConfig, plan_only: bool = False) -> None:
    """Checks that need no checkpoint and no process group; each message names the flag to change."""
    s, c, f, d = config.schedule, config.checkpointing, config.freeze, config.data
    _validate_finite(config)
    for name, value in (("--nnodes", config.launch.nodes), ("--gpus-per-node", config.launch.gpus_per_node)):
        if value is not None and value < 1:
            raise UserError(f"{name} {value}: must be at least 1")
    if c.load is None and not plan_only:
        raise UserError("--load is required: the expanded checkpoint to train (`llamapro expand` output) or a "
                        "training save directory to resume")
    if not plan_only and (s.train_iters is None) == (s.train_samples is None):
        raise UserError("give exactly one of --train-iters and --train-samples")
    for name, value in (("--micro-batch-size", s.micro_batch_size), ("--seq-length", s.seq_length),
                        ("--log-interval", config.logging.log_interval),
                        ("--eval-interval", config.logging.eval_interval)):
        if value is not None and value < 1:
            raise UserError(f"{name} {value}: must be at least 1")
    if s.lr_warmup_fraction is not None and not 0 <= s.lr_warmup_fraction < 1:
        raise UserError(f"--lr-warmup-fraction {s.lr_warmup_fraction}: expected a fraction in [0, 1)")
    if config.optimizer.min_lr > config.optimizer.lr:
        raise UserError(f"--min-lr {config.optimizer.min_lr} is larger than --lr {config.optimizer.lr}")
    if c.save_interval is not None and c.save_interval < 1:
        raise UserError(f"--save-interval {c.save_interval}: must be at least 1")
    if c.keep_last is not None and c.keep_last < 1:
        raise UserError(f"--keep-last {c.keep_last}: must be at least 1 (omit it to keep every checkpoint)")
    if f.freeze not in FREEZE_POLICIES:
        raise UserError(f"--freeze {f.freeze!r}: choose one of {', '.join(FREEZE_POLICIES)}")
    if f.freeze == "layers" and not f.trainable_layers:
        raise UserError("--freeze layers needs --trainable-layers I [J ...] (global 0-based layer indices)")
    if f.trainable_layers and f.freeze != "layers":
        raise UserError(f"--trainable-layers is used with --freeze layers (got --freeze {f.freeze})")
    if not plan_only and not d.mock_data and not d.data_path:
        raise UserError("--data-path is required (preprocessed PREFIX, or W1 PREFIX1 W2 PREFIX2 ...; with --sft: "
                        "chat .jsonl files); or --mock-data for random tokens")
    if d.sft and d.mock_data:
        raise UserError("--sft trains on chat .jsonl files given with --data-path; it does not go with --mock-data")
    if d.sft_packing not in SFT_PACKING:
        raise UserError(f"--sft-packing {d.sft_packing!r}: choose one of {', '.join(SFT_PACKING)}")
    if config.parallelism.distributed_timeout_minutes <= 0:
        raise UserError(f"--distributed-timeout-minutes {config.parallelism.distributed_timeout_minutes}: must be "
                        "positive")
    if s.exit_duration_in_mins is not None and s.exit_duration_in_mins <= 0:
        raise UserError(f"--exit-duration-in-mins {s.exit_duration_in_mins}: must be positive")
    _validate_parallelism(config.parallelism)
    tp = config.parallelism.tensor_model_parallel_size
    if config.parallelism.sequence_parallel and s.seq_length % tp:
        raise UserError(f"--sequence-parallel splits each sequence over the {tp} tensor-parallel ranks: "
                        f"--seq-length {s.seq_length} must be a multiple of {tp}")
    _validate_recompute(config.model)
    m = config.model
    if m.moe_token_dispatcher_type not in (None, *MOE_DISPATCHERS):
        raise UserError(f"--moe-token-dispatcher-type {m.moe_token_dispatcher_type!r}: choose one of "
                        f"{', '.join(MOE_DISPATCHERS)}")
    if m.moe_aux_loss_coeff is not None and m.moe_aux_loss_coeff < 0:
        raise UserError(f"--moe-aux-loss-coeff {m.moe_aux_loss_coeff}: must be 0 or more")
    _validate_fp8(m)


def _validate_finite(config: TrainConfig) -> None:
    """No setting is NaN or infinite (argparse's float and YAML both accept "nan" and "inf"; NaN passes every
    range check, so `--moe-aux-loss-coeff nan` would silently turn the loss off and `--lr inf` fail steps later)."""
    import math

    flag_of = {(section, name): flag for flag, (section, name, _) in FLAGS.items()}
    for section in _SECTION_CLASSES:
        for name, value in dataclasses.asdict(getattr(config, section)).items():
            if isinstance(value, float) and not math.isfinite(value):
                where = flag_of.get((section, name), f"{section}.{name}")
                raise UserError(f"{where} {value}: must be a finite number")


def _validate_fp8(m: ModelSection) -> None:
    for flag, value, choices in (("--fp8-format", m.fp8_format, FP8_FORMATS),
                                 ("--fp8-recipe", m.fp8_recipe, FP8_RECIPES),
                                 ("--fp8-amax-compute-algo", m.fp8_amax_compute_algo, FP8_AMAX_ALGOS)):
        if value is not None and value not in choices:
            raise UserError(f"{flag} {value!r}: choose one of {', '.join(choices)}")
    given = [flag for flag, value in (("--fp8-recipe", m.fp8_recipe),
                                      ("--fp8-amax-history-len", m.fp8_amax_history_len),
                                      ("--fp8-amax-compute-algo", m.fp8_amax_compute_algo)) if value is not None]
    if m.fp8_format is None:
        if given:
            raise UserError(f"{given[0]} configures FP8 training: it needs --fp8-format e4m3|hybrid")
        return
    if not m.bf16:
        raise UserError(f"--fp8-format {m.fp8_format} runs FP8 GEMMs inside bf16 training: add --bf16")
    if m.fp8_amax_history_len is not None and m.fp8_amax_history_len < 1:
        raise UserError(f"--fp8-amax-history-len {m.fp8_amax_history_len}: must be at least 1")
    recipe = m.fp8_scaling
    if recipe != "delayed" and (m.fp8_amax_history_len is not None or m.fp8_amax_compute_algo is not None):
        raise UserError(f"--fp8-amax-history-len/--fp8-amax-compute-algo set the delayed recipe's scales; "
                        f"--fp8-recipe {recipe} computes them from the current tensor")


def _validate_parallelism(p: ParallelismSection) -> None:
    vpp, per_chunk = p.virtual_pipeline_model_parallel_size, p.num_layers_per_virtual_pipeline_stage
    first, last = p.decoder_first_pipeline_num_layers, p.decoder_last_pipeline_num_layers
    if vpp is not None and per_chunk is not None:
        raise UserError(f"--virtual-pipeline-model-parallel-size {vpp} and --num-layers-per-virtual-pipeline-stage "
                        f"{per_chunk} are alternatives (chunks per rank, or layers per chunk); give one")
    for flag, value in (("--virtual-pipeline-model-parallel-size", vpp),
                        ("--num-layers-per-virtual-pipeline-stage", per_chunk),
                        ("--decoder-first-pipeline-num-layers", first), ("--decoder-last-pipeline-num-layers", last)):
        if value is None:
            continue
        if value < 1:
            raise UserError(f"{flag} {value}: must be at least 1")
        if p.pipeline_model_parallel_size < 2:
            raise UserError(f"{flag} {value} needs pipeline parallelism (--pipeline-model-parallel-size 2 or more)")
    if per_chunk is not None and (first is not None or last is not None):
        raise UserError("with uneven pipeline stages (--decoder-first/last-pipeline-num-layers) give the virtual "
                        "stages as --virtual-pipeline-model-parallel-size (chunks per rank), not "
                        f"--num-layers-per-virtual-pipeline-stage {per_chunk} (stages hold different layer counts)")
    if p.overlap_param_gather and not p.use_distributed_optimizer:
        raise UserError("--overlap-param-gather needs --use-distributed-optimizer (only sharded params are "
                        "all-gathered)")
    if p.overlap_param_gather and not p.overlap_grad_reduce:
        raise UserError("--overlap-param-gather needs --overlap-grad-reduce too (as in Megatron-LM)")
    if p.sequence_parallel and p.tensor_model_parallel_size < 2:
        raise UserError("--sequence-parallel splits activations over tensor-parallel ranks: it needs "
                        f"--tensor-model-parallel-size 2 or more (got {p.tensor_model_parallel_size})")
    if p.expert_model_parallel_size < 1:
        raise UserError(f"--expert-model-parallel-size {p.expert_model_parallel_size}: must be at least 1")
    if p.expert_tensor_parallel_size is not None and p.expert_tensor_parallel_size < 1:
        raise UserError(f"--expert-tensor-parallel-size {p.expert_tensor_parallel_size}: must be at least 1")


def _validate_recompute(m: ModelSection) -> None:
    g, method, n = m.recompute_granularity, m.recompute_method, m.recompute_num_layers
    if g is not None and g not in RECOMPUTE_GRANULARITIES:
        raise UserError(f"--recompute-granularity {g!r}: choose one of {', '.join(RECOMPUTE_GRANULARITIES)}")
    if method is not None and method not in RECOMPUTE_METHODS:
        raise UserError(f"--recompute-method {method!r}: choose one of {', '.join(RECOMPUTE_METHODS)}")
    if g is None and (method is not None or n is not None):
        raise UserError("--recompute-method/--recompute-num-layers need --recompute-granularity full")
    if g == "full" and (method is None or n is None):
        raise UserError("--recompute-granularity full needs --recompute-method uniform|block and "
                        "--recompute-num-layers N")
    if g == "selective" and (method is not None or n is not None):
        raise UserError("--recompute-granularity selective recomputes the attention core of every layer; it takes "
                        "no --recompute-method/--recompute-num-layers")
    if n is not None and n < 1:
        raise UserError(f"--recompute-num-layers {n}: must be at least 1")


def parse_data_path(data_path: list[str]) -> list[tuple[float, str]]:
    """Megatron-LM's --data-path: PREFIX [PREFIX ...] (equal weights) or W1 PREFIX1 W2 PREFIX2 ..."""
    items = [str(x) for x in data_path]

    def is_number(text: str) -> bool:
        try:
            float(text)
        except ValueError:
            return False
        return True

    if not any(is_number(x) for x in items):
        return [(1.0, p) for p in items]
    if len(items) % 2 or not all(is_number(w) for w in items[::2]):
        raise UserError(f"--data-path {' '.join(items)}: expected PREFIX ... or weight/prefix pairs "
                        "W1 PREFIX1 W2 PREFIX2 ...")
    pairs = [(float(w), p) for w, p in zip(items[::2], items[1::2])]
    bad = [w for w, _ in pairs if not 0 <= w < float("inf")]  # NaN fails this too
    if bad:
        raise UserError(f"--data-path: weight {bad[0]} must be a finite number, 0 or more")
    return pairs


def config_from_argv(argv: list[str]) -> TrainConfig:
    """The config the command line ``argv`` (flags and optional --config) describes."""
    parser = argparse.ArgumentParser(prog="llamapro train")
    add_arguments(parser)
    return config_from_args(parser.parse_args(argv))
