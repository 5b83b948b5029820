"""megatron-core end to end on CPU through llamapro_megatron.runtime (4 gloo ranks, one launch).

For the plain and the distributed optimizer: a tiny LLaMA-style GPTModel at TP=2 PP=2 with half of its decoder
layers frozen trains one step through megatron's pipeline schedule, DDP and optimizer; a torch_dist checkpoint
(model + optimizer) is saved, reloaded in the same layout and, after a re-init of the same processes at TP=1
PP=1 (DP=4), reloaded there. Losses are compared with an uninterrupted run; this catches each CPU redirect and
each torch-Adam fix of runtime/cpu.py (e.g. a shared Adam ``step`` after reload changes the next loss).
"""

from __future__ import annotations

import os

import pytest

from llamapro_megatron.runtime import run_workers

VOCAB, SEQ, MBS, NMB, LAYERS = 128, 16, 2, 2, 4
TRAINABLE_LAYERS = {2, 4}  # 1-based layer numbers, one per pipeline stage (LLaMA Pro: the expanded blocks)


class _Trainer:
    """Model + DDP + optimizer + pipeline schedule for the current parallel layout."""

    def __init__(self, dist_opt: bool) -> None:
        import torch
        import torch.distributed as dist
        from megatron.core import parallel_state as ps
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )
        from megatron.core.models.gpt import GPTModel
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.pipeline_parallel import get_forward_backward_func
        from megatron.core.transformer.transformer_config import TransformerConfig

        from llamapro_megatron.runtime import gpt_layer_spec, resolve_spec_kind

        self.dist, self.ps, self.torch = dist, ps, torch
        config = TransformerConfig(
            num_layers=LAYERS, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
            normalization="RMSNorm", layernorm_epsilon=1e-5, gated_linear_unit=True,
            activation_func=torch.nn.functional.silu, add_bias_linear=False, hidden_dropout=0.0,
            attention_dropout=0.0, tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
            pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(), sequence_parallel=False,
            use_cpu_initialization=True, params_dtype=torch.float32, pipeline_dtype=torch.float32,
        )
        self.model = GPTModel(
            config=config, transformer_layer_spec=gpt_layer_spec(resolve_spec_kind("auto")), vocab_size=VOCAB,
            max_sequence_length=SEQ, pre_process=ps.is_pipeline_first_stage(),
            post_process=ps.is_pipeline_last_stage(), position_embedding_type="rope", rotary_base=10000,
            share_embeddings_and_output_weights=False,
        )
        for param in self.model.parameters():  # LLaMA Pro: everything frozen but the expanded layers
            param.requires_grad = False
        for layer in self.model.decoder.layers:
            for param in layer.parameters():
                param.requires_grad = layer.layer_number in TRAINABLE_LAYERS
        self.ddp = DistributedDataParallel(
            config=config, module=self.model,
            ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                     use_distributed_optimizer=dist_opt),
        )
        config.finalize_model_grads_func = finalize_model_grads
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=1e-2, weight_decay=0.0, use_distributed_optimizer=dist_opt,
                            bf16=False, fp16=False, clip_grad=1.0),
            [self.ddp],
        )
        generator = torch.Generator().manual_seed(0)  # the same batches on every rank (so DP=4 == DP=1)
        self.batches = [torch.randint(0, VOCAB, (MBS, SEQ + 1), generator=generator) for _ in range(NMB)]
        self.fwd_bwd = get_forward_backward_func()

    def _forward_step(self, data_iterator, model):
        tokens = next(data_iterator)
        positions = self.torch.arange(SEQ).unsqueeze(0).expand(MBS, -1)
        output = model(tokens[:, :-1].contiguous(), positions, attention_mask=None, labels=tokens[:, 1:].contiguous())

        def loss_func(output_tensor):
            loss = output_tensor.float().mean()
            return loss, {"lm loss": loss.detach()}

        return output, loss_func

    def _run(self, forward_only: bool) -> float | None:
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        losses = self.fwd_bwd(forward_step_func=self._forward_step, data_iterator=iter(self.batches),
                              model=[self.ddp], num_microbatches=NMB, seq_length=SEQ, micro_batch_size=MBS,
                              forward_only=forward_only)
        if not self.ps.is_pipeline_last_stage():
            return None
        return sum(d["lm loss"].item() for d in losses) / NMB

    def train_step(self) -> None:
        self._run(forward_only=False)
        ok, _, _ = self.optimizer.step()
        assert ok

    def eval_loss(self) -> float:
        self.ddp.eval()
        with self.torch.no_grad():
            loss = self._run(forward_only=True)
        self.ddp.train()
        box = [loss]
        self.dist.broadcast_object_list(box, src=self.dist.get_world_size() - 1)  # last rank: last stage
        return box[0]

    def params(self) -> dict:
        return {n: p.detach().clone() for n, p in self.model.named_parameters()}

    def _checkpoint(self, is_loading: bool) -> dict:
        from llamapro_megatron.runtime import unstack_layer_keys

        model_sd = self.model.sharded_state_dict(prefix="")
        optim_sd = self.optimizer.sharded_state_dict(
            model_sd, is_loading=is_loading, metadata={"distrib_optim_sharding_type": "fully_reshardable"})
        return {"model": model_sd, "optimizer": unstack_layer_keys(optim_sd)}

    def save(self, path: str) -> None:
        from megatron.core import dist_checkpointing

        if self.dist.get_rank() == 0:
            os.makedirs(path, exist_ok=True)
        self.dist.barrier()
        dist_checkpointing.save(self._checkpoint(is_loading=False), path)

    def load(self, path: str) -> None:
        from megatron.core import dist_checkpointing

        state = dist_checkpointing.load(self._checkpoint(is_loading=True), path)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])


def _train_save_reload(root: str) -> dict:
    """One rank of the 4-rank scenario; returns what the test asserts on."""
    import torch

    from llamapro_megatron.runtime import destroy_distributed, init_distributed

    out: dict = {}
    for dist_opt in (False, True):
        tag = "dist" if dist_opt else "plain"
        ckpt = os.path.join(root, tag)
        info = init_distributed(tp=2, pp=2)
        assert (info.tp, info.pp, info.dp) == (2, 2, 1)
        trainer = _Trainer(dist_opt)
        before = trainer.params()
        trainer.train_step()
        after = trainer.params()
        out[f"{tag}/changed"] = sorted(n for n in before if not torch.equal(before[n], after[n]))
        out[f"{tag}/trainable"] = sorted(n for n, p in trainer.model.named_parameters() if p.requires_grad)
        out[f"{tag}/loss1"] = trainer.eval_loss()
        trainer.save(ckpt)
        trainer.train_step()  # the uninterrupted run's second step
        out[f"{tag}/loss2"] = trainer.eval_loss()
        with torch.no_grad():
            for param in trainer.model.parameters():
                param.zero_()
        trainer.load(ckpt)  # back to the state after step 1 (model and Adam moments/step)
        reloaded = trainer.params()
        out[f"{tag}/reload_equal"] = all(torch.equal(after[n], reloaded[n]) for n in after)
        trainer.train_step()
        out[f"{tag}/reload_loss2"] = trainer.eval_loss()
        del trainer
        destroy_distributed()

        info = init_distributed(tp=1, pp=1)  # the same 4 processes, now DP=4
        assert (info.tp, info.pp, info.dp) == (1, 1, 4)
        trainer = _Trainer(dist_opt)
        trainer.load(ckpt)  # a fresh optimizer builds its loading state dict before any step
        out[f"{tag}/tp1_loss1"] = trainer.eval_loss()
        trainer.train_step()
        out[f"{tag}/tp1_loss2"] = trainer.eval_loss()
        del trainer
        destroy_distributed()
    return out


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_tp2pp2_train_freeze_checkpoint_reshard(tmp_path):
    results = run_workers(_train_save_reload, 4, args=(str(tmp_path),), timeout_s=200)
    assert len(results) == 4
    for tag in ("plain", "dist"):
        for rank, res in enumerate(results):
            # exactly the trainable parameters (decoder layers 2 and 4) changed, on every rank
            assert res[f"{tag}/changed"] == res[f"{tag}/trainable"], (tag, rank)
            assert res[f"{tag}/trainable"], (tag, rank)
            assert res[f"{tag}/reload_equal"], (tag, rank)
        r = results[0]
        assert all(res[f"{tag}/loss1"] == r[f"{tag}/loss1"] for res in results)
        # same-layout reload continues exactly like the run that did not reload
        assert r[f"{tag}/reload_loss2"] == pytest.approx(r[f"{tag}/loss2"], abs=1e-6), tag
        assert r[f"{tag}/loss2"] != pytest.approx(r[f"{tag}/loss1"], abs=1e-4), "second step changed nothing"
        # resharded to TP1 PP1 (DP4): same eval loss, and the next Adam step matches the uninterrupted run
        assert r[f"{tag}/tp1_loss1"] == pytest.approx(r[f"{tag}/loss1"], abs=1e-5), tag
        assert r[f"{tag}/tp1_loss2"] == pytest.approx(r[f"{tag}/loss2"], abs=1e-4), tag
    # both optimizers perform the same Adam update
    assert results[0]["dist/loss2"] == pytest.approx(results[0]["plain/loss2"], abs=1e-5)
