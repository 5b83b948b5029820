"""Data blends: named corpora (indexed-dataset prefixes), weights and a train/valid/test split, built into
megatron-core `GPTDataset`s (blended by `BlendedMegatronDatasetBuilder`) for the trainer.

Weights are either
- `multiplier`: the paper's way: each corpus is seen `weight` times per epoch, so its sampling fraction is
  tokens x weight / sum(tokens x weight) (55B x 1.0 and 22B x 1.5 -> 62.5% / 37.5%); or
- `probability`: Megatron's normalised sampling probabilities, used as given (after normalising).

A split that leaves a corpus no documents (tiny corpora, e.g. 10 documents at "98,1,1") would make
GPTDataset loop forever looking for tokens; such a corpus is left out of that split with a warning, and a
split empty in every corpus is not built. Each split is built by its own builder call with the same split
bookends, so documents land in the same split as megatron-core would put them.

Building needs torch.distributed to be initialised (megatron-core calls get_rank / barrier).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llamapro_megatron.errors import UserError

logger = logging.getLogger(__name__)

WEIGHTINGS = ("multiplier", "probability")
SPLITS = ("train", "valid", "test")


@dataclass
class Corpus:
    prefix: str  # indexed dataset prefix: PREFIX.bin / PREFIX.idx (e.g. data/code_text_document)
    weight: float = 1.0
    name: str | None = None

    def __post_init__(self) -> None:
        self.name = self.name or Path(self.prefix).name
        if not self.weight > 0:
            raise UserError(f"corpus {self.name}: weight {self.weight} must be positive; drop the corpus instead")


@dataclass
class BlendConfig:
    corpora: list[Corpus]
    weighting: str = "probability"
    split: str = "98,1,1"
    seq_length: int = 4096
    seed: int = 1234
    cache_dir: str | None = None  # where megatron-core caches sample indices (None: not cached)
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    eod_mask_loss: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # more GPTDatasetConfig fields, passed through

    def __post_init__(self) -> None:
        if self.weighting not in WEIGHTINGS:
            raise UserError(f"data weighting {self.weighting!r}: expected one of {WEIGHTINGS}")
        if not self.corpora:
            raise UserError("data corpora: expected at least one corpus (prefix and weight)")
        parts = [p for p in str(self.split).replace("/", ",").split(",") if p.strip()]
        try:
            values = [float(p) for p in parts]
        except ValueError:
            values = []
        if not values or len(values) > 3 or any(v < 0 for v in values) or not sum(values) > 0:
            raise UserError(f"data split {self.split!r}: expected up to three non-negative numbers, e.g. '98,1,1'")

    @classmethod
    def from_dict(cls, d: dict) -> BlendConfig:
        """From YAML-style data: corpora as [{prefix, weight, name}] (or [prefix, weight] pairs)."""
        d = dict(d)
        corpora = []
        for c in d.pop("corpora", []):
            corpora.append(Corpus(*c) if isinstance(c, (list, tuple)) else Corpus(**c))
        known = set(cls.__dataclass_fields__) - {"corpora", "extra"}
        extra = {k: d.pop(k) for k in list(d) if k not in known}
        return cls(corpora=corpora, extra={**extra, **d.pop("extra", {})}, **d)


def sampling_fractions(tokens: list[int], weights: list[float], weighting: str) -> list[float]:
    """The share of samples each corpus gets."""
    raw = [t * w for t, w in zip(tokens, weights)] if weighting == "multiplier" else list(weights)
    total = sum(raw)
    if not total > 0:
        raise UserError(f"data blend: weights {weights} over token counts {tokens} sum to zero; check the corpora")
    return [r / total for r in raw]


def _split_matrix(split: str) -> list:
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    return convert_split_vector_to_split_matrix(parse_and_normalize_split(split))


@dataclass
class CorpusStats:
    corpus: Corpus
    documents: list[int]  # per split
    tokens: list[int]  # per split


def corpus_stats(config: BlendConfig) -> list[CorpusStats]:
    """Documents and tokens of each corpus in each split (megatron-core's rounding of the bookends)."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    matrix = _split_matrix(config.split)
    stats = []
    for corpus in config.corpora:
        for suffix in (".bin", ".idx"):
            if not Path(corpus.prefix + suffix).is_file():
                raise UserError(
                    f"corpus {corpus.name}: {corpus.prefix}{suffix} not found; run `llamapro preprocess` first "
                    "(a prefix names PREFIX.bin/.idx, e.g. data/code_text_document)"
                )
        dataset = IndexedDataset(corpus.prefix)
        lengths = np.array(dataset.sequence_lengths)  # a copy: the mmap closes with the dataset
        del dataset
        n = lengths.shape[0]
        cumulative = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
        docs, toks = [], []
        for bookend in matrix:
            if bookend is None:
                docs.append(0)
                toks.append(0)
                continue
            beg, end = int(round(bookend[0] * n)), int(round(bookend[1] * n))
            docs.append(end - beg)
            toks.append(int(cumulative[end] - cumulative[beg]))
        stats.append(CorpusStats(corpus, docs, toks))
    return stats


def describe(config: BlendConfig, stats: list[CorpusStats] | None = None) -> str:
    """A table of the blend: tokens, weight and resulting sampling fraction per corpus (train split)."""
    stats = stats or corpus_stats(config)
    tokens = [s.tokens[0] for s in stats]
    weights = [s.corpus.weight for s in stats]
    fractions = sampling_fractions(tokens, weights, config.weighting) if sum(tokens) else [0.0] * len(stats)
    lines = [f"data blend ({config.weighting} weights, split {config.split}):"]
    lines.append(f"  {'corpus':<24} {'train tokens':>14} {'weight':>8} {'fraction':>9}")
    for s, w, f in zip(stats, weights, fractions):
        lines.append(f"  {s.corpus.name:<24} {s.tokens[0]:>14,} {w:>8g} {f:>9.2%}")
    if config.weighting == "multiplier":
        epoch = sum(t * w for t, w in zip(tokens, weights))
        lines.append(f"  tokens per epoch (each corpus x its multiplier): {epoch:,.0f}")
    else:
        # The corpus that runs out first sets the epoch: tokens drawn until its tokens are used once.
        epoch = min((t / f for t, f in zip(tokens, fractions) if f > 0), default=0)
        lines.append(f"  tokens per epoch (until the first corpus is used up): {epoch:,.0f}")
    return "\n".join(lines)


def build_datasets(
    config: BlendConfig,
    tokenizer,
    num_samples: tuple[int | None, int | None, int | None],
    is_built_on_rank: Callable[[], bool] | None = None,
) -> list:
    """(train, valid, test) megatron-core datasets of `num_samples` sequences each (None/0: not built).

    Each is a BlendedDataset over several corpora or a GPTDataset for one; samples are dicts of tensors
    (tokens, labels, loss_mask, position_ids, attention_mask) of `config.seq_length`. `is_built_on_rank`
    says which ranks read data (Megatron: tensor-parallel rank 0 of the first and last pipeline stages);
    default: every rank.
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    from llamapro_megatron.runtime.safe_load import restrict_dataset_caches

    restrict_dataset_caches()  # a shared cache directory holds data, never code
    stats = corpus_stats(config)
    logger.info(describe(config, stats))
    matrix = _split_matrix(config.split)
    results: list = []
    for i, split_name in enumerate(SPLITS):
        n = num_samples[i] if i < len(num_samples) else None
        if not n:
            results.append(None)
            continue
        usable = [s for s in stats if s.documents[i] > 0 and s.tokens[i] > 0]
        for s in stats:
            if s not in usable:
                warnings.warn(
                    f"corpus {s.corpus.name} has no documents in the {split_name} split ({config.split}, "
                    f"{sum(s.documents)} documents in all); it is left out of {split_name}",
                    stacklevel=2,
                )
        if not usable:
            warnings.warn(f"no corpus has documents in the {split_name} split: not built", stacklevel=2)
            results.append(None)
            continue
        prefixes = [s.corpus.prefix for s in usable]
        weights = sampling_fractions([s.tokens[i] for s in usable], [s.corpus.weight for s in usable], config.weighting)
        gpt_config = GPTDatasetConfig(
            random_seed=config.seed,
            sequence_length=config.seq_length,
            blend=(prefixes, weights if len(prefixes) > 1 else None),
            split=config.split,
            tokenizer=tokenizer,
            reset_position_ids=config.reset_position_ids,
            reset_attention_mask=config.reset_attention_mask,
            eod_mask_loss=config.eod_mask_loss,
            path_to_cache=config.cache_dir,
            **config.extra,
        )
        # Build only this split, with the same bookends as the full split (same documents in it).
        gpt_config.split_matrix = [m if j == i else None for j, m in enumerate(matrix)]
        sizes = [n if j == i else 0 for j in range(len(SPLITS))]  # 0, not None: the builder asserts None => no weights
        built = BlendedMegatronDatasetBuilder(GPTDataset, sizes, is_built_on_rank or _every_rank, gpt_config).build()
        results.append(built[i])
    return results


def _every_rank() -> bool:
    return True
