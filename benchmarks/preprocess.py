"""Preprocessing throughput against the raw tokenizer's encode rate on the same text, in the same run.

    python benchmarks/preprocess.py --tokenizer TOKENIZER [--input FILE.jsonl] [--workers 1 2]

The floor is the tokenizer library's own encode loop over the same documents in this process (no JSON,
no output). `llamapro preprocess` then runs end to end (read, parse, tokenize, write .bin/.idx) with each
worker count. Target: >= 80% of the raw rate per worker, near-linear scaling. Without --input the text is
this Python's standard library sources (real code, ~25 MB).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sysconfig
import tempfile
import time
from pathlib import Path


def stdlib_jsonl(path: Path, max_mb: float) -> Path:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    total = 0
    with open(path, "w", encoding="utf-8") as f:
        for p in sorted(stdlib.rglob("*.py")):
            if "site-packages" in p.parts:
                continue
            try:
                text = p.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            if text.strip():
                f.write(json.dumps({"text": text}) + "\n")
                total += len(text)
                if total > max_mb * 1e6:
                    break
    return path


def raw_rate(tokenizer_path: str, texts: list[str]) -> tuple[int, float, float]:
    """Tokens and seconds of the library's own encode, one document at a time (what a worker does)."""
    from llamapro_megatron.data.tokenizer import SENTENCEPIECE, load_tokenizer

    tok = load_tokenizer(tokenizer_path)
    backend = tok._backend
    start, cpu = time.perf_counter(), time.process_time()
    if tok.kind == SENTENCEPIECE:
        n = sum(len(backend.encode(t)) for t in texts)
    else:
        n = sum(len(backend.encode(t, add_special_tokens=False).ids) for t in texts)
    return n, time.perf_counter() - start, time.process_time() - cpu


def _encode_share(args: tuple[str, list[str]]) -> int:
    tokenizer_path, texts = args
    return raw_rate(tokenizer_path, texts)[0]


def raw_parallel_rate(tokenizer_path: str, texts: list[str], processes: int) -> float:
    """The floor for N workers: the library's encode in N forked processes, each over an equal share."""
    import multiprocessing

    shares = [(tokenizer_path, texts[i::processes]) for i in range(processes)]
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        pool.map(_encode_share, [(tokenizer_path, ["warm up"])] * processes)  # workers started and imported
        start = time.perf_counter()
        tokens = sum(pool.map(_encode_share, shares, chunksize=1))
        return tokens / (time.perf_counter() - start)


def cpu_seconds() -> float:
    """CPU time of this process and its reaped children (the pool's workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--input", type=Path, help="jsonl with a 'text' key (default: stdlib sources)")
    parser.add_argument("--max-mb", type=float, default=12.0, help="size of the default stdlib corpus")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    from llamapro_megatron.data.preprocess import preprocess

    with tempfile.TemporaryDirectory() as tmp:
        src = args.input or stdlib_jsonl(Path(tmp) / "corpus.jsonl", args.max_mb)
        texts = [json.loads(line)["text"] for line in open(src, encoding="utf-8") if line.strip()]
        mb = sum(len(t.encode()) for t in texts) / 1e6
        print(
            f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
            f"python {platform.python_version()}"
        )
        print(f"corpus: {src if args.input else 'python stdlib sources'} ({len(texts)} documents, {mb:.1f} MB)")
        print(f"tokenizer: {args.tokenizer}")
        tokens, seconds, cpu = raw_rate(args.tokenizer, texts)
        raw = tokens / seconds
        header = ("run", "tokens", "wall s", "tokens/s", "per worker", "CPU s", "tokens/CPU s")
        print("{:<24} {:>11} {:>7} {:>10} {:>10} {:>7} {:>12}".format(*header))
        print(
            f"{'raw encode (floor)':<24} {tokens:>11,} {seconds:>7.2f} {raw:>10,.0f} {'100%':>10} {cpu:>7.2f} "
            f"{tokens / cpu:>12,.0f}"
        )
        for w in args.workers:
            before = cpu_seconds()
            stats = preprocess(
                [src], args.tokenizer, Path(tmp) / f"out{w}", workers=w, progress=False, log=lambda m: None
            )
            used = cpu_seconds() - before
            rate = stats.tokens / stats.seconds
            print(
                f"{f'preprocess, {w} worker(s)':<24} {stats.tokens:>11,} {stats.seconds:>7.2f} {rate:>10,.0f} "
                f"{rate / w / raw:>10.0%} {used:>7.2f} {stats.tokens / used:>12,.0f}"
            )
            if w > 1:
                floor = raw_parallel_rate(args.tokenizer, texts, w)
                print(f"{f'raw encode, {w} processes':<24} {'':>11} {'':>7} {floor:>10,.0f} {floor / w / raw:>10.0%}"
                      f"   -> preprocess = {rate / floor:.0%} of this parallel floor")
        print("per worker = (preprocess tokens/s / workers) / raw tokens/s; CPU s counts all processes;\n"
              "the N-process raw encode shows what the machine itself allows N processes")


if __name__ == "__main__":
    main()
