"""Small real jsonl corpora from artifacts that exist offline (tests and the quickstart).

Code = the running interpreter's Python standard library sources; math = CHAMP problems with step-by-step
solutions (and the `derivations` book text when its pdf is given); general = botchan (English prose); chat =
CHAMP problem -> solution conversations for SFT. Each corpus is written as train.jsonl + heldout.jsonl
({"text": ..., "source": ...} per line). The held-out split takes every document whose stable hash falls in the
held-out fraction, so it does not depend on file order or on the other documents.
"""
from __future__ import annotations

import ast
import hashlib
import json
import os
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path


def is_heldout(key: str, fraction: float) -> bool:
    digest = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
    return digest / 2**64 < fraction


def python_sources(max_bytes: int) -> Iterator[dict]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib).as_posix()
        if rel.startswith(("site-packages/", "test/", "idlelib/idle_test/", "lib2to3/tests/")):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip() and len(text) <= max_bytes:
            yield {"text": text, "source": f"python-stdlib/{rel}"}


def _parse_field(value):
    """CHAMP stores nested fields as Python-literal strings."""
    if isinstance(value, str) and value[:1] in "{[":
        try:
            return ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return value
    return value


def champ_problems(path: Path) -> Iterator[tuple[str, str, str]]:
    """(identifier, problem, step-by-step solution with the final answer)."""
    problems = json.loads(path.read_text(encoding="utf-8"))["problems"]
    for ident, p in sorted(problems.items()):
        solution = _parse_field(p.get("solution"))
        steps = solution.get("steps", []) if isinstance(solution, dict) else []
        text = "\n".join(s.get("_text", "") for s in steps if isinstance(s, dict)).strip()
        answer = p.get("_answer") or p.get("_raw_answer")
        if answer and text:
            text += f"\nThe answer is {answer}."
        if text and p.get("_text"):
            yield ident, p["_text"], text


def derivations_pages(pdf: Path, pages_per_doc: int = 4) -> Iterator[dict]:
    from pypdf import PdfReader

    reader = PdfReader(str(pdf))
    texts = [(page.extract_text() or "").strip() for page in reader.pages]
    for i in range(0, len(texts), pages_per_doc):
        text = "\n\n".join(t for t in texts[i : i + pages_per_doc] if t)
        if len(text) > 200:  # skip near-empty pages (figures, blank pages)
            yield {"text": text, "source": f"derivations/pages-{i + 1}-{i + pages_per_doc}"}


def botchan_paragraphs(path: Path, lines_per_doc: int = 20) -> Iterator[dict]:
    lines = path.read_text(encoding="utf-8").splitlines()
    for i in range(0, len(lines), lines_per_doc):
        text = "\n".join(lines[i : i + lines_per_doc]).strip()
        if text:
            yield {"text": text, "source": f"botchan/lines-{i + 1}"}


class SplitWriter:
    """train.jsonl / heldout.jsonl of one corpus, written under temporary names and renamed when closed."""

    def __init__(self, directory: Path, fraction: float) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.fraction = fraction
        self.final = {s: directory / f"{s}.jsonl" for s in ("train", "heldout")}
        self.files = {s: open(f"{p}.partial", "w", encoding="utf-8") for s, p in self.final.items()}
        self.counts = {"train": 0, "heldout": 0}

    def write(self, record: dict) -> None:
        split = "heldout" if is_heldout(record["source"], self.fraction) else "train"
        self.files[split].write(json.dumps(record, ensure_ascii=False) + "\n")
        self.counts[split] += 1

    def close(self) -> dict:
        for split, f in self.files.items():
            f.close()
            os.replace(f"{self.final[split]}.partial", self.final[split])
        return self.counts


def build(out: Path, champ: Path, botchan: Path, derivations: Path | None, heldout: float = 0.05,
          max_code_bytes: int = 200_000) -> dict:
    summary = {}
    code = SplitWriter(out / "code", heldout)
    for record in python_sources(max_code_bytes):
        code.write(record)
    summary["code"] = code.close()

    math = SplitWriter(out / "math", heldout)
    chat = SplitWriter(out / "chat", heldout)
    for ident, problem, solution in champ_problems(champ):
        math.write({"text": f"Problem: {problem}\n\nSolution: {solution}", "source": f"champ/{ident}"})
        chat.write(
            {
                "messages": [
                    {"role": "user", "content": problem},
                    {"role": "assistant", "content": solution},
                ],
                "source": f"champ/{ident}",
            }
        )
    if derivations is not None and derivations.is_file():
        for record in derivations_pages(derivations):
            math.write(record)
    else:
        print("note: no derivations.pdf; math has CHAMP only", file=sys.stderr)
    summary["math"] = math.close()
    summary["chat"] = chat.close()

    general = SplitWriter(out / "general", heldout)
    for record in botchan_paragraphs(botchan):
        general.write(record)
    summary["general"] = general.close()
    return summary
