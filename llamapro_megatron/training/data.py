"""Batches for the training step: blended megatron-core GPTDatasets (or seeded random tokens), by position.

The data position is the number of consumed training samples: global batch k holds samples
[k*G, (k+1)*G); its micro batch m gives data-parallel rank d the samples starting at k*G + (m*D + d)*B
(Megatron-LM's pretraining sampler). Resuming at consumed_samples therefore continues the same stream, at any
data-parallel size. Validation always uses the first eval_iters global batches of the validation split, so
evaluations are comparable across steps and runs.

SFT (``--sft``): the chat files become packed or padded samples (``llamapro_megatron.data.sft``); ``--split``
divides them in order into training and validation samples. Training sample i is taken from epoch i // n through
a permutation seeded by (seed, epoch), so the stream is a function of the position alone, as above.
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


class SFTSamples:
    """Samples of an SFT dataset by position: shuffled once per epoch (train) or in order (validation)."""

    def __init__(self, dataset, indices: list[int], seed: int | None, packed: bool) -> None:
        self.dataset, self.indices, self.seed, self.packed = dataset, indices, seed, packed
        self._epoch: tuple[int, list[int]] | None = None

    def __len__(self) -> int:
        return len(self.indices)

    def _order(self, epoch: int) -> list[int]:
        if self.seed is None:
            return self.indices
        if self._epoch is None or self._epoch[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch = (epoch, [self.indices[j] for j in torch.randperm(len(self.indices), generator=g)])
        return self._epoch[1]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        n = len(self.indices)
        item = self.dataset[self._order(i // n)[i % n]]
        if not self.packed:  # one conversation per sample: the causal mask suffices (and TE needs no mask)
            item.pop("attention_mask")
        return item


def sft_samples(config: TrainConfig, tokenizer) -> tuple[SFTSamples, SFTSamples | None]:
    """Training and validation samples of the chat files in --data-path, divided in order by --split."""
    from megatron.core.datasets.blended_megatron_dataset_config import parse_and_normalize_split

    from llamapro_megatron.data.sft import SFTDataset
    from llamapro_megatron.runtime.specs import resolve_spec_kind

    paths = [str(p) for p in config.data.data_path]
    packed = config.data.sft_packing == "packed"
    if packed and resolve_spec_kind(config.model.spec) == "te":
        # TE's causal attention ignores an explicit mask: packed conversations would attend to each other
        raise UserError("--sft-packing packed needs a layer spec that applies the block-diagonal attention mask "
                        "(--spec local); with Transformer Engine use --sft-packing padded")
    dataset = SFTDataset(paths, tokenizer, config.schedule.seq_length, packed=packed)
    weights = parse_and_normalize_split(config.data.split)
    n = len(dataset)
    n_train = round(n * weights[0])
    n_valid = round(n * (weights[0] + weights[1])) - n_train
    if n_train < 1:
        raise UserError(f"--data-path {' '.join(paths)} --split {config.data.split}: {n} SFT samples leave none "
                        "for training; give the train split a share or add conversations")
    train = SFTSamples(dataset, list(range(n_train)), config.seed, packed)
    valid = SFTSamples(dataset, list(range(n_train, n_train + n_valid)), None, packed) if n_valid else None
    return train, valid


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
        if config.data.sft:
            self.train, self.valid = sft_samples(config, tokenizer)
            return
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
        keys = [*KEYS, "attention_mask"] if "attention_mask" in samples[0] else KEYS
        return {k: torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in keys}

    def train_batches(self, consumed_samples: int) -> list[dict[str, torch.Tensor]]:
        """This rank's micro batches of the global batch that starts at ``consumed_samples``."""
        return [self._micro(self.train, consumed_samples, m) for m in range(self.shape.num_microbatches)]

    def valid_batches(self, index: int) -> list[dict[str, torch.Tensor]] | None:
        if self.valid is None:
            return None
        return [self._micro(self.valid, index * self.shape.global_batch_size, m)
                for m in range(self.shape.num_microbatches)]
