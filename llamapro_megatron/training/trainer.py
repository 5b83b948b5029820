"""The training run, top to bottom: set up the layout, build and freeze the model, load, then step.

One call of :func:`train` per rank (torchrun, or :func:`~llamapro_megatron.runtime.run_workers`). A step: this
rank's micro batches of the global batch go through megatron-core's pipeline schedule (gradient accumulation
inside), DDP reduces the gradients, the optimizer clips and steps, the scheduler moves the lr. Periodically: log,
validate, save. A non-finite loss stops the run before the optimizer step, naming the last good checkpoint.
"""
from __future__ import annotations

import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from llamapro_megatron.errors import UserError
from llamapro_megatron.training.config import TrainConfig


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""


# A run that --exit-signal-handler stopped (saved, not finished) exits with the status of a process that SIGTERM ended,
# on every rank: a script or scheduler sees it did not finish, and under torchrun the agents of the other nodes see a
# failed worker and stop at once (after a clean exit an agent would wait up to 300 s for the signalled node's agent,
# which SIGTERM ended, in torch elastic's exit barrier).
STOPPED_BY_SIGNAL = 128 + 15


@dataclass
class TrainResult:
    iteration: int = 0
    consumed_samples: int = 0
    losses: dict[int, float] = field(default_factory=dict)  # iteration -> training loss
    grad_norms: dict[int, float] = field(default_factory=dict)  # iteration -> gradient norm before clipping
    stage_layers: dict[int, list[int]] = field(default_factory=dict)  # pipeline stage -> its trainable layers
    parameter_counts: dict[str, int] = field(default_factory=dict)  # trainable / frozen, each parameter once
    eval_losses: dict[int, float] = field(default_factory=dict)
    last_checkpoint: str | None = None
    exit_reason: str = "done"
    seconds_per_step: list[float] = field(default_factory=list)
    optimizer_state_bytes: int = 0  # Adam moments (+ fp32 main params under bf16), summed over all ranks
    # MoE: iteration -> {layer: its router's load-balancing loss, per micro batch}; only routers that train add one
    moe_aux_losses: dict[int, dict[int, float]] = field(default_factory=dict)


def train(config: TrainConfig, on_step: Callable[[int, float], None] | None = None) -> TrainResult:
    """Run (or resume) training as configured; returns what happened, on every rank."""
    from llamapro_megatron.runtime import destroy_distributed, init_distributed
    from llamapro_megatron.training.checkpointer import resolve_load, resume_from_save
    from llamapro_megatron.training.layout import resolve_pipeline

    config = resume_from_save(config)
    config = resolve_pipeline(config, resolve_load(config)[1].arch)  # virtual stages need the layer count
    p = config.parallelism
    if p.tensor_model_parallel_size > 1:
        # one CUDA work queue, so that a tensor-parallel all-reduce or (sequence parallel) all-gather is queued
        # before the GEMM it overlaps (Megatron-LM's launch scripts set it; megatron-core's tensor_parallel/layers.py
        # warns without it). Set before the first CUDA call; a value of the user's own stays.
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    info = init_distributed(p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                            p.virtual_pipeline_model_parallel_size, seed=config.seed, ep=p.expert_model_parallel_size,
                            etp=p.expert_tensor_parallel_size, timeout_s=60 * p.distributed_timeout_minutes)
    try:
        return _Run(config, info).run(on_step)
    finally:
        destroy_distributed()


class _Run:
    def __init__(self, config: TrainConfig, info) -> None:
        from megatron.core.distributed import finalize_model_grads
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from llamapro_megatron.training import checkpointer, data, freeze, layout, metrics, model, optimizer

        self.config, self.info = config, info
        self.rank0 = info.rank == 0
        self.source, self.meta = checkpointer.resolve_load(config)
        chunks = model.build_model_chunks(self.meta, config)
        freeze.apply_freeze(chunks, self.meta, config.freeze)
        self._report_parameters(freeze.stage_counts(chunks, info.pp_rank, info.tp_rank))
        self.model = model.wrap_for_training(chunks, config)
        for chunk in chunks:
            chunk.config.finalize_model_grads_func = finalize_model_grads
        model.configure_overlap(self.model, config)
        self.shape = data.batch_shape(config, info.dp)
        layout.check_microbatches(config, self.shape.num_microbatches)
        self.steps = optimizer.resolve_steps(config, self.shape.global_batch_size)
        self.optimizer = optimizer.build_optimizer(self.model, config)
        optimizer.check_checkpointable(self.optimizer, config)
        self.scheduler = optimizer.build_scheduler(self.optimizer, config, self.steps)
        self.checkpointer = checkpointer.Checkpointer(config, self.meta, self.source, self.model,
                                                      self.optimizer, self.scheduler)
        self.start = self.checkpointer.load()
        tokenizer = config.data.tokenizer_model or _tokenizer_dir(self.source)
        self.data = data.TrainingData(config, self.meta.arch.vocab_size, self.shape, info.dp_rank,
                                      self.steps.train_iters, config.logging.eval_iters, tokenizer)
        self.fwd_bwd = get_forward_backward_func()
        self.per_token_loss = chunks[0].config.calculate_per_token_loss
        layers = freeze.trainable_layers(self.meta, config.freeze)
        first_chunk = layout.first_chunk_layers(config, self.meta.arch) if info.pp > 1 else 10**9
        self.flops = metrics.flops_per_token(
            self.meta.arch, self.meta.padded_vocab_size, config.schedule.seq_length, layers,
            # full recomputation back-propagates from the bottom of the first chunk (see model.py)
            config.freeze.train_embeddings or config.model.recompute_granularity == "full",
            config.freeze.train_output_layer, first_chunk)
        self.peak = metrics.peak_tflops(config.logging.peak_tflops)
        self.writer = metrics.ScalarWriter(config.logging.tensorboard_dir if self.rank0 else None)
        self.stop_signal = False
        if config.schedule.exit_signal_handler:
            signal.signal(signal.SIGTERM, self._on_sigterm)

    # ------------------------------------------------------------------ loop
    def run(self, on_step: Callable[[int, float], None] | None) -> TrainResult:
        config, s = self.config, self.config.schedule
        result = TrainResult(self.start.iteration, self.start.consumed_samples, stage_layers=self.stage_layers,
                             parameter_counts=self.parameter_counts)
        self._log(f"training iterations {result.iteration} -> {self.steps.train_iters} (global batch "
                  f"{self.shape.global_batch_size} = micro {self.shape.micro_batch_size} x "
                  f"{self.shape.num_microbatches} micro batches x DP {self.info.dp}), from {self.source}")
        if config.logging.eval_at_start and result.iteration == 0:
            self._evaluate(0, result)
        started, window_seconds, window_steps = time.time(), 0.0, 0
        while result.iteration < self.steps.train_iters:
            t0 = time.time()
            batches = self.data.train_batches(result.consumed_samples)
            local_loss = self._forward_backward(batches, forward_only=False)
            aux_losses = self._moe_aux_losses(len(batches)) if self.meta.arch.is_moe else {}
            elapsed_min = (time.time() - started) / 60
            loss, stop_signal, timed_out = self._agree(local_loss, self.stop_signal, s.exit_duration_in_mins
                                                       is not None and elapsed_min > s.exit_duration_in_mins)
            step = result.iteration + 1
            if not math.isfinite(loss):
                last = self.checkpointer.last_saved
                raise TrainingDiverged(
                    f"the training loss is {loss} at step {step}; no optimizer step was taken. Last good "
                    f"checkpoint: {last if last else 'none (this run saved none)'}; resume from it with "
                    "--load, e.g. with a lower --lr or more --lr-warmup-iters")
            ok, grad_norm, _ = self.optimizer.step()
            if grad_norm is not None and not math.isfinite(grad_norm):
                raise TrainingDiverged(f"the gradient norm is {grad_norm} at step {step}; last good checkpoint: "
                                       f"{self.checkpointer.last_saved or 'none'}")
            self.scheduler.step(increment=1)
            result.iteration, result.consumed_samples = step, result.consumed_samples + self.shape.global_batch_size
            result.losses[step] = loss
            if aux_losses:
                result.moe_aux_losses[step] = aux_losses
            if grad_norm is not None:
                result.grad_norms[step] = float(grad_norm)
            result.seconds_per_step.append(time.time() - t0)  # the step alone: no logging, eval or save
            window_seconds, window_steps = window_seconds + result.seconds_per_step[-1], window_steps + 1
            if on_step is not None:
                on_step(step, loss)
            if step % config.logging.log_interval == 0 or step == self.steps.train_iters:
                self._log_step(step, loss, grad_norm, window_seconds, window_steps, aux_losses)
                window_seconds, window_steps = 0.0, 0
            if step % config.logging.eval_interval == 0 or step == self.steps.train_iters:
                self._evaluate(step, result)
            interval = config.checkpointing.save_interval
            if config.checkpointing.save and interval and step % interval == 0:
                result.last_checkpoint = self._save(step, result.consumed_samples)
            if stop_signal or timed_out:
                result.exit_reason = "signal" if stop_signal else "duration"
                self._log(f"exiting at step {step} ({'SIGTERM' if stop_signal else '--exit-duration-in-mins'})")
                break
        if config.checkpointing.save and str(self.checkpointer.last_saved or "") != _iter_dir(config, result):
            result.last_checkpoint = self._save(result.iteration, result.consumed_samples)
        if result.exit_reason == "signal":
            saved = (f"saved {result.last_checkpoint}; the same command resumes from it" if result.last_checkpoint
                     else "nothing saved (no --save)")
            self._log(f"stopped by SIGTERM before the last step: {saved} (exit status {STOPPED_BY_SIGNAL} on every "
                      "rank)")
        self.writer.close()
        result.optimizer_state_bytes = self._optimizer_state_bytes()
        return result

    def _save(self, iteration: int, consumed_samples: int) -> str:
        from llamapro_megatron.training.model import sync_params

        sync_params(self.model, self.config)
        return str(self.checkpointer.save(iteration, consumed_samples))

    def _optimizer_state_bytes(self) -> int:
        seen, total = set(), 0
        inner = getattr(self.optimizer, "chained_optimizers", [self.optimizer])
        for opt in inner:
            tensors = [t for state in opt.optimizer.state.values() for t in state.values()
                       if isinstance(t, torch.Tensor)]
            if opt.config.bf16:  # fp32 main copies of the trainable params
                tensors += [p for g in opt.optimizer.param_groups for p in g["params"]]
            for t in tensors:
                if id(t) not in seen and t.dim() > 0:
                    seen.add(id(t))
                    total += t.numel() * t.element_size()
        value = torch.tensor([total], dtype=torch.float64, device=self.info.device)
        dist.all_reduce(value)
        return int(value.item())

    def _moe_aux_losses(self, num_microbatches: int) -> dict[int, float]:
        """This step's load-balancing loss of each MoE layer whose router adds one (the trainable ones, `freeze.py`),
        as megatron-core's tracker recorded it (summed over pipeline stages, averaged over data-parallel ranks), per
        micro batch; then the tracker is cleared for the next step. Collective."""
        from megatron.core.transformer.moe import moe_utils

        name = "load_balancing_loss"
        if name not in moe_utils.get_moe_layer_wise_logging_tracker():
            return {}
        moe_utils.reduce_aux_losses_tracker_across_ranks([name])
        values = moe_utils.get_moe_layer_wise_logging_tracker()[name]["values"].tolist()
        moe_utils.clear_aux_losses_tracker()
        return {layer: v / num_microbatches for layer, v in enumerate(values) if v != 0}

    def _forward_backward(self, batches: list[dict], forward_only: bool) -> tuple[float, float] | None:
        """(loss sum, weight) over this rank's micro batches (last pipeline stage), None elsewhere.

        The weight is the number of micro batches, or of loss tokens with the per-token loss (SFT)."""
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        iterators = [iter(batches) for _ in self.model]
        losses = self.fwd_bwd(
            forward_step_func=self._forward_step,
            data_iterator=iterators if len(iterators) > 1 else iterators[0],
            model=self.model, num_microbatches=len(batches), seq_length=self.config.schedule.seq_length,
            micro_batch_size=self.shape.micro_batch_size, forward_only=forward_only)
        if not losses:
            return None
        if self.per_token_loss:  # each micro batch reports [loss sum, loss tokens]
            return sum(d["lm loss"][0].item() for d in losses), sum(d["lm loss"][1].item() for d in losses)
        return sum(d["lm loss"].item() for d in losses), float(len(losses))

    def _forward_step(self, data_iterator, model):
        batch = {k: v.to(self.info.device) for k, v in next(data_iterator).items()}
        # packed SFT samples carry a block-diagonal mask (True = masked); otherwise the spec's causal mask applies.
        # With labels the model returns [b, s] fp32 per-token losses: megatron-core's cross-entropy (fused on CUDA
        # unless --no-cross-entropy-loss-fusion) over logits whose padded vocabulary rows are masked (model.py).
        output = model(batch["tokens"], batch["position_ids"], attention_mask=batch.get("attention_mask"),
                       labels=batch["labels"])

        def loss_func(token_losses: torch.Tensor):
            mask = batch["loss_mask"].float()
            if self.per_token_loss:  # megatron-core divides the gradients by the global batch's loss tokens
                total, count = (token_losses * mask).sum(), mask.sum()
                return total, count.to(torch.int), {"lm loss": torch.stack([total.detach(), count])}
            loss = (token_losses * mask).sum() / mask.sum().clamp(min=1)
            return loss, {"lm loss": loss.detach().clone()}  # the schedule divides loss in place

        return output, loss_func

    def _agree(self, local_loss: tuple[float, float] | None, stop_signal: bool,
               timed_out: bool) -> tuple[float, bool, bool]:
        """One all-reduce: the loss (weighted over the data-parallel last-stage ranks), stop flags."""
        from megatron.core import parallel_state as ps

        reports = local_loss is not None and ps.get_tensor_model_parallel_rank() == 0
        total, weight = local_loss if reports else (0.0, 0.0)
        values = torch.tensor([total, weight, float(stop_signal), float(timed_out)], dtype=torch.float64,
                              device=self.info.device)
        dist.all_reduce(values)
        loss = (values[0] / values[1]).item() if values[1] > 0 else float("nan")
        return loss, bool(values[2] > 0), bool(values[3] > 0)

    def _on_sigterm(self, signum, frame) -> None:
        self.stop_signal = True

    # ------------------------------------------------------------- reporting
    def _evaluate(self, step: int, result: TrainResult) -> None:
        iters = self.config.logging.eval_iters
        if iters < 1:
            return
        first = self.data.valid_batches(0)
        if first is None:
            if step == self.config.logging.eval_interval or step == self.steps.train_iters:
                self._log(f"warning: --split {self.config.data.split} leaves no validation data; validation "
                          "skipped (give the second split entry a share)")
            return
        for chunk in self.model:
            chunk.eval()
        total = 0.0
        with torch.no_grad():
            for i in range(iters):
                batches = first if i == 0 else self.data.valid_batches(i)
                loss, _, _ = self._agree(self._forward_backward(batches, forward_only=True), False, False)
                total += loss
        for chunk in self.model:
            chunk.train()
        result.eval_losses[step] = total / iters
        self._log(f"validation at step {step}: loss {total / iters:.4f}  ppl {math.exp(min(total / iters, 50)):.2f}")
        self.writer.add({"lm-loss-validation": total / iters}, step)

    def _log_step(self, step: int, loss: float, grad_norm: float | None, seconds: float, steps: int,
                  aux_losses: dict[int, float]) -> None:
        from llamapro_megatron.training.optimizer import current_lr

        tokens = steps * self.shape.global_batch_size * self.config.schedule.seq_length
        tokens_per_s = tokens / max(seconds, 1e-9)
        tflops = self.flops.per_token * tokens_per_s / self.info.world_size / 1e12
        six_n = self.flops.six_n_per_token * tokens_per_s / self.info.world_size / 1e12
        lr = current_lr(self.optimizer)
        mfu = f"{100 * tflops / self.peak:.1f}%" if self.peak else "n/a (--peak-tflops)"
        self._log(f"step {step}/{self.steps.train_iters} | loss {loss:.4f} | lr {lr:.3e} | grad norm "
                  f"{grad_norm if grad_norm is None else f'{grad_norm:.3f}'} | {seconds / steps:.2f} s/step | "
                  f"{tokens_per_s:,.0f} tokens/s | {tflops:.3f} TFLOP/s/device (counted) MFU {mfu} | "
                  f"6N convention: {six_n:.3f} TFLOP/s/device"
                  + (f" | load-balancing loss {sum(aux_losses.values()) / len(aux_losses):.4f} (mean of the "
                     f"{len(aux_losses)} trained routers)" if aux_losses else ""))
        values = {"lm-loss": loss, "learning-rate": lr, "tokens-per-second": tokens_per_s,
                  "tflops-per-device": tflops, "tflops-per-device-6n": six_n}
        if aux_losses:
            values["load-balancing-loss"] = sum(aux_losses.values()) / len(aux_losses)
        if grad_norm is not None:
            values["grad-norm"] = grad_norm
        if self.peak:
            values["mfu"] = tflops / self.peak
        self.writer.add(values, step)

    def _report_parameters(self, counts) -> None:
        from megatron.core import parallel_state as ps

        # dense parameters add up over data-parallel replica 0, experts over expert-data-parallel replica 0
        gathered = [None] * self.info.world_size
        dist.all_gather_object(gathered, (ps.get_data_parallel_rank(), ps.get_expert_data_parallel_rank(), counts))
        self.stage_layers = {}
        for _, _, c in gathered:
            self.stage_layers.setdefault(c.pp_rank, set()).update(c.trainable_layers)
        self.stage_layers = {stage: sorted(layers) for stage, layers in sorted(self.stage_layers.items())}
        if not any(c.trainable + c.expert_trainable for _, _, c in gathered):  # every rank sees the same list
            raise UserError(f"nothing to train: --freeze {self.config.freeze.freeze} leaves no trainable parameter")
        by_stage: dict[int, list[tuple[int, int]]] = {}  # stage -> (trainable, frozen) of each rank's share
        stage_of = {}  # stage -> the counts of one of its ranks (its layers)
        for dp_rank, expert_dp_rank, c in gathered:
            shares = by_stage.setdefault(c.pp_rank, [])
            if dp_rank == 0:
                shares.append((c.trainable, c.frozen))
                stage_of.setdefault(c.pp_rank, c)
            if expert_dp_rank == 0:
                shares.append((c.expert_trainable, c.expert_frozen))
        self.parameter_counts = {"trainable": sum(t for shares in by_stage.values() for t, _ in shares),
                                 "frozen": sum(f for shares in by_stage.values() for _, f in shares)}
        if not self.rank0:
            return
        lines = [f"parameters per pipeline stage (policy --freeze {self.config.freeze.freeze}):"]
        total_t = total_f = 0
        for stage in sorted(by_stage):
            t, f = sum(t for t, _ in by_stage[stage]), sum(f for _, f in by_stage[stage])
            total_t, total_f = total_t + t, total_f + f
            layers, held = stage_of[stage].trainable_layers, _ranges(stage_of[stage].layers)
            lines.append(f"  stage {stage}: trainable {t:>14,}  frozen {f:>14,}  layers {held}, trainable {layers}")
        lines.append(f"  total  : trainable {total_t:>14,}  frozen {total_f:>14,}  "
                     f"({100 * total_t / max(total_t + total_f, 1):.1f}% trains)")
        print("\n".join(lines), flush=True)

    def _log(self, message: str) -> None:
        if self.rank0:
            print(message, flush=True)


def _ranges(layers: list[int]) -> str:
    """[0, 1, 4, 5] -> "0-1, 4-5" (a stage's layers, chunk by chunk under virtual pipeline stages)."""
    runs: list[list[int]] = []
    for layer in layers:
        if runs and layer == runs[-1][-1] + 1:
            runs[-1].append(layer)
        else:
            runs.append([layer])
    return ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs) or "none"


def _tokenizer_dir(source: Path) -> str | None:
    from llamapro_megatron.checkpoint.mcore import TOKENIZER_DIR

    path = source / TOKENIZER_DIR
    return str(path) if path.is_dir() else None


def _iter_dir(config: TrainConfig, result: TrainResult) -> str:
    from llamapro_megatron.checkpoint.mcore import iteration_dir_name

    return str(Path(config.checkpointing.save) / iteration_dir_name(result.iteration))
