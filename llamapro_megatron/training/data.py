"""Batches for the training step: blended megatron-core GPTDatasets (or seeded random tokens), by position.

The data position is the number of consumed training samples: global batch k holds samples
[k*G, (k+1)*G); its micro batch m gives data-parallel rank d the samples starting at k*G + (m*D + d)*B
(Megatron-LM's pretraining sampler). Resuming at consumed_samples therefore continues the same stream, at any
data-parallel size. Validation always uses the first eval_iters global batches of the validation split, so
evaluations are comparable across steps and runs.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from llamapro_megatron.errors import UserError
from llamapro_megatron.training.config import TrainConfig, parse_data_path

KEYS = ("tokens", "labels", "loss_mask", "position_ids")


@dataclass(frozen=True)
class BatchShape:
    micro_batch_size: int
    global_batch_size: int
    data_parallel_size: int

    @property
    def num_microbatches(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.data_parallel_size)


def batch_shape(config: TrainConfig, dp: int) -> BatchShape:
    s = config.schedule
    gbs = s.global_batch_size or s.micro_batch_size * dp
    if gbs % (s.micro_batch_size * dp):
        raise UserError(f"--global-batch-size {gbs} is not a multiple of --micro-batch-size {s.micro_batch_size} x "
                        f"data-parallel size {dp} = {s.micro_batch_size * dp}")
    return BatchShape(s.micro_batch_size, gbs, dp)


class MockSamples:
    """Sample i: seq+1 tokens drawn from a generator seeded by (seed, i); independent of order and layout."""

    def __init__(self, vocab_size: int, seq_length: int, seed: int) -> None:
        self.vocab_size, self.seq_length, self.seed = vocab_size, seq_length, seed

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        text = torch.randint(0, self.vocab_size, (self.seq_length + 1,), generator=g)
        return {"tokens": text[:-1], "labels": text[1:], "loss_mask": torch.ones(self.seq_length),
                "position_ids": torch.arange(self.seq_length)}


class TrainingData:
    def __init__(self, config: TrainConfig, vocab_size: int, shape: BatchShape, dp_rank: int,
                 train_iters: int, eval_iters: int, tokenizer_path: str | None) -> None:
        self.shape, self.dp_rank = shape, dp_rank
        seq = config.schedule.seq_length
        if config.data.mock_data:
            self.train, self.valid = MockSamples(vocab_size, seq, config.seed), MockSamples(vocab_size, seq,
                                                                                             config.seed + 1)
            return
        from llamapro_megatron.data.blend import BlendConfig, Corpus, build_datasets
        from llamapro_megatron.data.tokenizer import load_tokenizer

        if tokenizer_path is None:
            raise UserError("the checkpoint has no tokenizer/ directory; pass --tokenizer-model (the tokenizer the "
                            "data was preprocessed with)")
        tokenizer = load_tokenizer(tokenizer_path)
        corpora = [Corpus(prefix, weight) for weight, prefix in parse_data_path(config.data.data_path)]
        blend = BlendConfig(corpora=corpora, weighting=config.data.data_weighting, split=config.data.split,
                            seq_length=seq, seed=config.seed, cache_dir=config.data.data_cache_path)
        n_valid = eval_iters * shape.global_batch_size
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*has no documents in the.*")
            self.train, self.valid, _ = build_datasets(blend, tokenizer,
                                                       (train_iters * shape.global_batch_size, n_valid, None))
        if self.train is None:
            raise UserError(f"--data-path {' '.join(config.data.data_path)} --split {config.data.split}: the "
                            "training split has no documents; give the train split a share")

    def _micro(self, dataset, start: int, m: int) -> dict[str, torch.Tensor]:
        b, d = self.shape.micro_batch_size, self.shape.data_parallel_size
        first = start + (m * d + self.dp_rank) * b
        samples = [dataset[first + j] for j in range(b)]
        return {k: torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in KEYS}

    def train_batches(self, consumed_samples: int) -> list[dict[str, torch.Tensor]]:
        """This rank's micro batches of the global batch that starts at ``consumed_samples``."""
        return [self._micro(self.train, consumed_samples, m) for m in range(self.shape.num_microbatches)]

    def valid_batches(self, index: int) -> list[dict[str, torch.Tensor]] | None:
        if self.valid is None:
            return None
        return [self._micro(self.valid, index * self.shape.global_batch_size, m)
                for m in range(self.shape.num_microbatches)]
