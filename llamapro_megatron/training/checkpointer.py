"""Training checkpoints: torch_dist in Megatron-LM's directory layout, written atomically, resumable anywhere.

    SAVE/latest_checkpointed_iteration.txt     moved (atomically) only after every rank finished writing
    SAVE/iter_0000500/                         model, optimizer, scheduler, iteration, consumed samples, RNG
        llamapro.json  tokenizer/              architecture + expansion metadata, tokenizer (export needs both)
        checksums.json                         every file's size and digest (`llamapro verify --integrity`)
    SAVE/iter_0000600.partial/                 a save in progress (or one a crash interrupted): never loaded

Model tensors are stored in the dtype of the weights the run started from (``llamapro.json`` ``dtype``), not
the training dtype: frozen tensors are written from their original values, so they stay bit-exact even when the
originals are fp16 and training runs in bf16 (then their originals are kept in host memory). Optimizer state
gives each decoder layer its own key (``unstack_layer_keys``): only the trainable layers have any.

``--save-trainable-only``: the model part of a save is the trainable tensors alone (per-layer keys), and
``llamapro.json`` records the base checkpoint that holds the frozen ones (``checkpoint/trainable.py``): the
checkpoint this run loaded, or that checkpoint's own base when it was a trainable-only save itself. Loading
either form goes through the checkpoint reader (``checkpoint/load.py``).
"""
from __future__ import annotations

import random
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from llamapro_megatron.arch import torch_dtype
from llamapro_megatron.checkpoint import integrity, trainable
from llamapro_megatron.checkpoint.load import load
from llamapro_megatron.checkpoint.mcore import (
    LATEST_FILE,
    META_FILE,
    RELEASE,
    TOKENIZER_DIR,
    CheckpointMeta,
    iteration_dir_name,
    read_meta,
    recorded_layout,
    resolve_checkpoint,
)
from llamapro_megatron.checkpoint.output import fsync_path, make_durable, partial_dir, write_durably
from llamapro_megatron.errors import UserError
from llamapro_megatron.runtime.dist_ckpt import (
    optimizer_state_for_loading,
    rank_independent_optimizer_state,
    unstack_layer_keys,
)
from llamapro_megatron.training.config import TrainConfig
from llamapro_megatron.training.model import unwrap

OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}  # loads at any TP/PP/DP
TRAINED_WEIGHTS = "trained_weights"  # fp32 training's trainable weights as they are (needs_trained_weights)


@dataclass
class ResumeState:
    iteration: int = 0
    consumed_samples: int = 0
    loaded_optimizer: bool = False
    source: Path | None = None


class Checkpointer:
    """Loads the run's starting point and saves its checkpoints; one per rank, collective calls."""

    def __init__(self, config: TrainConfig, meta: CheckpointMeta, source: Path, model: list, optimizer,
                 scheduler) -> None:
        self.config, self.meta, self.source = config, meta, source
        self.chunks = [unwrap(m) for m in model]
        self.optimizer, self.scheduler = optimizer, scheduler
        self.stored_dtype = torch_dtype(meta.dtype)
        self.originals: list[dict[str, torch.Tensor]] = [{} for _ in self.chunks]
        self.last_saved: Path | None = source if source.name != RELEASE else None
        # where frozen tensors live for a trainable-only save, and what the loaded save had trained
        if trainable.is_trainable_only(meta):
            self.base, self.trained_before = trainable.resolve_base(source, meta), set(meta.trainable_only["keys"])
        else:
            self.base, self.trained_before = source.resolve(), set()

    # ------------------------------------------------------------ state dicts
    def _state(self, is_loading: bool, with_optimizer: bool, with_rng: bool,
               with_trained_weights: bool = False, with_fp8_state: bool = False) -> dict[str, Any]:
        model_sd = {self._model_key(i): c.sharded_state_dict() for i, c in enumerate(self.chunks)}
        for sd in model_sd.values():  # TE keeps its FP8 scaling state here; a local-spec checkpoint has none
            for key in [k for k in sd if k.endswith("_extra_state")]:
                if is_loading and not with_fp8_state:
                    del sd[key]
        state: dict[str, Any] = dict(model_sd)
        if with_optimizer:
            # Built from the model entries while their data are still the parameters (mapped by identity).
            optim_sd = self.optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=OPTIM_METADATA)
            state["optimizer"] = rank_independent_optimizer_state(unstack_layer_keys(optim_sd), is_loading)
            if with_trained_weights:
                state[TRAINED_WEIGHTS] = self._trained_weights(model_sd, is_loading)
        if with_rng:
            state["rng_state"] = _rng_sharded_object()
        for i, chunk in enumerate(self.chunks):
            sd = model_sd[self._model_key(i)]
            if not is_loading and self.config.checkpointing.save_trainable_only:
                names = {name for name, p in chunk.named_parameters() if p.requires_grad}
                sd = state[self._model_key(i)] = trainable.trainable_entries(sd, names)
            self._set_stored_tensors(i, chunk, sd, is_loading)
        return state

    def needs_trained_weights(self) -> bool:
        """Whether the optimizer keeps no copy of the weights it trains (megatron-core's FP32Optimizer updates the
        parameters themselves) while the save's model part is narrower than them: then the save also holds the
        trainable weights as they are (`TRAINED_WEIGHTS`), or a resume would start from their rounded copies."""
        from megatron.core.optimizer.optimizer import FP32Optimizer

        narrower = any(p.requires_grad and p.dtype != self.stored_dtype
                       for chunk in self.chunks for p in chunk.parameters())
        return narrower and any(isinstance(opt, FP32Optimizer) for opt in _optimizers(self.optimizer))

    def _trained_weights(self, model_sd: dict, is_loading: bool) -> dict:
        """The model entries of the trainable parameters under their own keys, holding the parameters (a save) or
        buffers of their dtype (a load); per-layer keys, as only some layers train."""
        import dataclasses

        out = {}
        for i, chunk in enumerate(self.chunks):
            trainable_ids = {id(p) for p in chunk.parameters() if p.requires_grad}
            for name, entry in model_sd[self._model_key(i)].items():
                param = getattr(entry, "data", None)
                if id(param) in trainable_ids:
                    data = torch.empty_like(param) if is_loading else param.detach()
                    out[f"{i}.{name}"] = dataclasses.replace(entry, key=f"{TRAINED_WEIGHTS}.{entry.key}", data=data)
        return unstack_layer_keys(out)

    def _copy_trained_weights(self, loaded: dict) -> None:
        tensors = {f"{i}.{name}": p for i, chunk in enumerate(self.chunks) for name, p in chunk.named_parameters()}
        with torch.no_grad():
            for name, value in loaded.items():
                tensors[name].copy_(value)

    def _model_key(self, i: int) -> str:
        return "model" if len(self.chunks) == 1 else f"model{i}"

    def _set_stored_tensors(self, i: int, chunk, sd: dict, is_loading: bool) -> None:
        """Point each model entry at a tensor of the stored dtype: a load buffer, or the value to write."""
        tensors = chunk.state_dict(keep_vars=True)
        for name, entry in sd.items():
            param = tensors.get(name)
            if not isinstance(param, torch.Tensor) or getattr(entry, "data", None) is not param:
                continue
            if is_loading:
                entry.data = torch.empty(param.shape, dtype=self.stored_dtype, device=param.device)
            else:
                original = self.originals[i].get(name)
                entry.data = original if original is not None else param.detach().to(self.stored_dtype)

    # ------------------------------------------------------------------ load
    def load(self) -> ResumeState:
        """Load --load: weights always; optimizer, scheduler, position and RNG when resuming a training save.

        A converted/expanded ``release`` checkpoint (or --finetune) starts a fresh run at iteration 0.
        """
        from megatron.core import dist_checkpointing

        from llamapro_megatron.runtime.safe_load import refusals_surface

        c = self.config.checkpointing
        with refusals_surface(self.source):
            common = dist_checkpointing.load_common_state_dict(str(self.source))
        resuming = "opt_param_scheduler" in common and not c.finetune
        with_optimizer = resuming and not c.no_load_optim
        saved_layout = common.get("layout", {})
        same_layout = saved_layout == _layout(self.config)
        with_rng = resuming and not c.no_load_rng and same_layout
        if resuming and not c.no_load_rng and not same_layout:
            _warn_rank0(f"{self.source} was written at {saved_layout}, this run is {_layout(self.config)}: RNG "
                        "states are not restored (they are per tensor/pipeline rank)")
        with_trained = with_optimizer and common.get("has_trained_weights", False) and self.needs_trained_weights()
        with_fp8 = self._restores_fp8_state(resuming, common, same_layout)
        state = self._state(is_loading=True, with_optimizer=with_optimizer, with_rng=with_rng,
                            with_trained_weights=with_trained, with_fp8_state=with_fp8)
        model_keys = [self._model_key(i) for i in range(len(self.chunks))]
        loaded = load(state, self.source, self.meta, model_keys=model_keys, strict=True)
        for i, chunk in enumerate(self.chunks):
            self._copy_into_model(i, chunk, loaded[self._model_key(i)])
        if with_optimizer:
            self.optimizer.load_state_dict(optimizer_state_for_loading(loaded["optimizer"]))
            _model_params_from_main_params(self.optimizer)
            if with_trained:
                self._copy_trained_weights(loaded[TRAINED_WEIGHTS])
            self.scheduler.load_state_dict(common["opt_param_scheduler"])
        else:
            self.optimizer.reload_model_params()  # main (fp32) params from the loaded weights
        if with_rng:
            _restore_rng(loaded["rng_state"])
        if not resuming:
            return ResumeState(source=self.source)
        return ResumeState(int(common["iteration"]), int(common["consumed_train_samples"]), with_optimizer,
                           self.source)

    def _restores_fp8_state(self, resuming: bool, common: dict, same_layout: bool) -> bool:
        """Whether to restore TE's FP8 scaling state (amax history, scales): when an FP8 run resumes an FP8 save
        at the same layout. Otherwise the run starts from TE's initial scales, as a fresh FP8 run does, and the
        first steps' scales differ from an uninterrupted run's (the weights and optimizer are restored all the
        same): bf16 -> FP8, a changed TP/PP layout (the state is per rank), a trainable-only save (it stores the
        trainable tensors only)."""
        if not (resuming and self.config.model.fp8_format is not None and common.get("fp8_state", False)):
            return False
        if not same_layout:
            _warn_rank0(f"{self.source} was written at {common.get('layout')}, this run is {_layout(self.config)}: "
                        "TE's FP8 scaling state is per rank and is not restored (the scales start afresh)")
        return same_layout

    def _copy_into_model(self, i: int, chunk, loaded: dict) -> None:
        tensors = chunk.state_dict(keep_vars=True)
        missing = [k for k in tensors if k not in loaded and not k.endswith("_extra_state")]
        if missing:
            raise UserError(f"{self.source} lacks {missing[:3]}... for this model; is it the same architecture?")
        fp8_state = {k: loaded.pop(k) for k in [k for k in loaded if k.endswith("_extra_state")]}
        if fp8_state:  # TE's modules read their own state (set_extra_state); nothing else is in this dict
            chunk.load_state_dict(fp8_state, strict=False)
        with torch.no_grad():
            for name, value in loaded.items():
                param = tensors[name]
                param.copy_(value)
                if isinstance(param, torch.nn.Parameter) and not param.requires_grad and value.dtype != param.dtype:
                    self.originals[i][name] = value.cpu()  # the exact frozen value, written at every save

    # ------------------------------------------------------------------ save
    def save(self, iteration: int, consumed_samples: int) -> Path:
        """Write SAVE/iter_<iteration> through a .partial directory, then move the latest pointer."""
        from llamapro_megatron.runtime.dist_ckpt import save as save_sharded

        root = Path(self.config.checkpointing.save)
        final = root / iteration_dir_name(iteration)
        tmp = partial_dir(final)
        rank0 = dist.get_rank() == 0
        if rank0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        with_trained = self.needs_trained_weights()
        state = self._state(is_loading=False, with_optimizer=True, with_rng=True, with_trained_weights=with_trained)
        trainable_only = self._trainable_only_record(state) if self.config.checkpointing.save_trainable_only else None
        state.update(self._common(iteration, consumed_samples), has_trained_weights=with_trained)
        save_sharded(state, str(tmp))
        dist.barrier()  # every rank has written its shards
        digests = integrity.gathered_digests(tmp)
        if rank0:
            meta = CheckpointMeta(arch=self.meta.arch, padded_vocab_size=self.meta.padded_vocab_size,
                                  dtype=self.meta.dtype, layout=_layout(self.config),
                                  source={"kind": "training", "load": str(self.source)},
                                  expansion=self.meta.expansion, iteration=iteration, trainable_only=trainable_only)
            (tmp / META_FILE).write_text(meta.to_json())
            tokenizer = self.source / TOKENIZER_DIR
            if tokenizer.is_dir():
                shutil.copytree(tokenizer, tmp / TOKENIZER_DIR)
            integrity.record(tmp, digests)
            make_durable(tmp)  # before the rename and the pointer: they must never name data still in a cache
            if final.exists():  # left by a run that died between the rename and the pointer update
                shutil.rmtree(final)
            tmp.rename(final)
            fsync_path(root)
            write_durably(root / LATEST_FILE, str(iteration))
            self._prune(root, iteration)
        dist.barrier()
        self.last_saved = final
        return final

    def _trainable_only_record(self, state: dict[str, Any]) -> dict[str, Any] | None:
        """The base and the stored keys of a trainable-only save (on rank 0; None elsewhere). Collective."""
        mine = sorted({k for i in range(len(self.chunks)) for entry in state[self._model_key(i)].values()
                       for k in trainable.stored_keys(entry)})
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
        keys = sorted(set().union(*map(set, gathered)))
        untrained = sorted(self.trained_before - set(keys))
        if untrained:  # their trained values are in the loaded save, not in the base: a new save would lose them
            raise UserError(f"--save-trainable-only: {self.source} trained {untrained[:3]}... which this run "
                            "freezes, so its base lacks their values; save in full (drop --save-trainable-only) "
                            "or train them")
        if dist.get_rank() != 0:
            return None
        return {"base": str(self.base), "fingerprint": trainable.fingerprint(self.base), "keys": keys}

    def _common(self, iteration: int, consumed_samples: int) -> dict[str, Any]:
        return {
            "checkpoint_version": 3.0,
            "iteration": iteration,
            "consumed_train_samples": consumed_samples,
            "opt_param_scheduler": self.scheduler.state_dict(),
            "layout": _layout(self.config),
            "llamapro": {"expansion": self.meta.expansion, "dtype": self.meta.dtype},
            "train_config": self.config.to_dict(),
            # TE's FP8 scaling state is in the save's model entries (trainable-only saves keep trainable tensors)
            "fp8_state": self.config.model.fp8_format is not None and not self.config.checkpointing.save_trainable_only,
        }

    def _prune(self, root: Path, newest: int) -> None:
        keep = self.config.checkpointing.keep_last
        if keep is None:
            return
        iters = sorted(int(p.name[5:]) for p in root.glob("iter_*") if p.name[5:].isdigit() and p.is_dir())
        for it in iters[:-keep]:
            if it != newest and (root / iteration_dir_name(it)).resolve() != self.base:  # a base stays
                shutil.rmtree(root / iteration_dir_name(it), ignore_errors=True)


def resolve_load(config: TrainConfig) -> tuple[Path, CheckpointMeta]:
    """The checkpoint directory --load (--ckpt-step) names, and its metadata."""
    c = config.checkpointing
    path = resolve_checkpoint(c.load, c.ckpt_step)
    return path, read_meta(path)


def resume_from_save(config: TrainConfig) -> TrainConfig:
    """The run rerun as it was started resumes: when --save already holds a checkpoint of its own (the latest
    pointer names an iteration) and --ckpt-step does not choose one, training continues from it rather than from
    --load. A job that a scheduler or torchrun's --max-restarts starts again with the same command, or a user
    relaunching every node after losing one, thus picks up where the last complete checkpoint left off. The flags
    that say how to take --load (--finetune, --no-load-optim, --no-load-rng) describe the run's starting point,
    not its resumption: they do not apply then."""
    import dataclasses

    from llamapro_megatron.runtime.launch import current_rank

    c = config.checkpointing
    if not c.save or c.ckpt_step is not None or not (Path(c.save) / LATEST_FILE).is_file():
        return config
    latest = resolve_checkpoint(c.save, flag="--save")
    if latest.name == RELEASE or (c.load and resolve_checkpoint(c.load).resolve() == latest.resolve()):
        return config
    if current_rank() == 0:
        print(f"resuming from {latest}, the latest checkpoint in --save (this run started from --load {c.load}); "
              "to start over instead, give a new --save directory", flush=True)
    resumed = dataclasses.replace(c, load=c.save, finetune=False, no_load_optim=False, no_load_rng=False)
    return dataclasses.replace(config, checkpointing=resumed)


def _layout(config: TrainConfig) -> dict[str, int | None]:
    p = config.parallelism
    return recorded_layout(p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                           p.virtual_pipeline_model_parallel_size, p.expert_model_parallel_size,
                           p.expert_tensor_parallel_size)


def _warn_rank0(message: str) -> None:
    if dist.get_rank() == 0:
        warnings.warn(message, stacklevel=3)


def _optimizers(optimizer) -> list:
    """megatron-core's optimizers inside a ChainedOptimizer (or the one given)."""
    return getattr(optimizer, "chained_optimizers", [optimizer])


def _model_params_from_main_params(optimizer) -> None:
    """Round the bf16 weights from the loaded fp32 main params, as every step of the uninterrupted run left them.

    The save's model part is in the originals' dtype: an fp16 copy of a bf16 weight loses the values below fp16's
    normal range (a zero-initialised down projection has some after a few steps), so the weights loaded from it
    are not the ones the run had. fp32 training has no separate main params (nothing to do)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in _optimizers(optimizer):
        copy = getattr(opt, "_copy_main_params_to_model_params", None)
        if copy is None:
            continue
        copy()
        if isinstance(opt, DistributedOptimizer):  # each rank rounded its shard: gather the whole weights
            for chunk in opt.model_chunks:
                chunk.start_param_sync(force_sync=True)


# ------------------------------------------------------------------- RNG
def _rng_sharded_object():
    """Megatron-LM's layout: one object per (pipeline, tensor) rank; data-parallel ranks are replicas."""
    import numpy as np
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    states = {"random": random.getstate(), "np": np.random.get_state(), "torch": torch.get_rng_state(),
              "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    pp, tp = ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size()
    return ShardedObject("rng_state", states, (pp, tp),
                         (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()),
                         replica_id=ps.get_data_parallel_rank())


def _restore_rng(states: dict) -> None:
    import numpy as np
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    random.setstate(states["random"])
    np.random.set_state(states["np"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
    get_cuda_rng_tracker().set_states(states["tracker"])
