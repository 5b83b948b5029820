"""`llamapro preprocess`: jsonl/parquet -> megatron-core indexed dataset (`PREFIX_<key>_document.bin/.idx`)."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser(
        "preprocess",
        help="tokenize jsonl/parquet corpora into megatron-core indexed datasets",
        description="Tokenize .jsonl, .jsonl.gz or .parquet documents into PREFIX_<key>_document.bin/.idx, "
        "the indexed dataset megatron-core's GPTDataset reads.",
    )
    p.add_argument("--input", nargs="+", required=True, metavar="FILE", help=".jsonl, .jsonl.gz or .parquet files")
    p.add_argument(
        "--json-keys",
        nargs="+",
        default=["text"],
        metavar="KEY",
        help="document fields to tokenize, one output dataset per key (default: text)",
    )
    p.add_argument(
        "--tokenizer",
        required=True,
        metavar="PATH",
        help="Hugging Face model directory, tokenizer.model (SentencePiece), tokenizer.json or llama gguf",
    )
    p.add_argument("--out", required=True, metavar="PREFIX", help="output prefix; writes PREFIX_<key>_document.*")
    p.add_argument("--workers", type=int, default=1, metavar="N", help="tokenizer processes (default 1)")
    p.add_argument("--append-eod", action="store_true", help="append the EOS token to every document")
    p.add_argument("--prepend-bos", action="store_true", help="prepend the BOS token to every document")
    p.add_argument("--strict", action="store_true", help="stop at the first invalid line instead of skipping it")
    p.add_argument("--batch-size", type=int, default=256, metavar="N",
                   help="at most N documents per worker task (a task also ends at ~128K characters)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from llamapro_megatron.data.preprocess import preprocess

    stats = preprocess(
        args.input,
        args.tokenizer,
        args.out,
        json_keys=args.json_keys,
        workers=args.workers,
        append_eod=args.append_eod,
        prepend_bos=args.prepend_bos,
        strict=args.strict,
        batch_size=args.batch_size,
        progress=False if args.no_progress else None,
    )
    print(stats.summary())
    for key, prefix in stats.outputs.items():
        print(f"{key}: {prefix}.bin / {prefix}.idx")
    return 0
