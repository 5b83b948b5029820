"""Loading gguf vocabularies: a byte-level BPE one (Qwen2's, 151,646 tokens), first load against a cached one; a
SentencePiece one (LLaMA's 32,000 pieces) against parsing its fields once.

    python benchmarks/gguf_tokenizer.py [--repeats 3]

Each repeat uses an empty cache ($LLAMAPRO_CACHE in a temporary folder) and times, in this process (transformers
and the tokenizers imported before the first timing):
  read       gguf_vocab.read_fields of Qwen2's: GGUFReader parsing the file's fields (what a load needs to learn
             the kind)
  first      load_tokenizer on the empty cache: read + transformers' GGUF conversion + writing the cache folder
  cached     load_tokenizer again: the file's sha256, then the cached tokenizer.json
  spm read   gguf_vocab.read_fields of LLaMA's SentencePiece vocabulary (the floor of its load)
  spm load   load_tokenizer of it: one parse, the ModelProto rebuilt, SentencePiece loading it
  spm twice  what a load did before it shared one reader: vocabulary_model and sentencepiece_model_from_gguf each
             parsing the file, then SentencePiece loading the ModelProto
Prints medians, first / cached, spm load / spm read (one parse: about 1) and spm twice / spm load.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import transformers  # noqa: F401  (imported before any timing)

    from llamapro_megatron.artifacts import llama_spm_vocab, qwen2_vocab
    from llamapro_megatron.data import gguf_vocab
    from llamapro_megatron.data.tokenizer import load_tokenizer

    path, spm = qwen2_vocab(), llama_spm_vocab()
    from sentencepiece import SentencePieceProcessor

    def spm_twice():
        gguf_vocab.vocabulary_model(spm)  # no reader given: each call parses the file
        SentencePieceProcessor(model_proto=gguf_vocab.sentencepiece_model_from_gguf(spm))

    times: dict[str, list[float]] = {"read": [], "first": [], "cached": [], "spm read": [], "spm load": [],
                                     "spm twice": []}
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as cache:
            os.environ["LLAMAPRO_CACHE"] = cache
            for name, run in (("read", lambda: gguf_vocab.read_fields(path)),
                              ("first", lambda: load_tokenizer(path)), ("cached", lambda: load_tokenizer(path)),
                              ("spm read", lambda: gguf_vocab.read_fields(spm)),
                              ("spm load", lambda: load_tokenizer(spm)), ("spm twice", spm_twice)):
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{path.name}, {args.repeats} repeats, {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}")
    for name, value in med.items():
        print(f"  {name:<9} median {value:6.2f} s   (runs: {', '.join(f'{t:.2f}' for t in times[name])})")
    print(f"  first / cached: {med['first'] / med['cached']:.1f}x")
    print(f"  spm load / spm read: {med['spm load'] / med['spm read']:.2f}")
    print(f"  spm twice / spm load: {med['spm twice'] / med['spm load']:.2f}x")


if __name__ == "__main__":
    main()
