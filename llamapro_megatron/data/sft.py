"""SFT samples for the Instruct stage: chat jsonl -> token ids + a loss mask where only assistant tokens count.

A conversation is rendered with the tokenizer's chat template when it has one. The template is rendered
incrementally (messages[:i], with the generation prompt before each assistant turn), and the text each turn
adds becomes one segment: the assistant's reply (with the template's end-of-turn marker) is trained, all
other text - system/user turns, the assistant header - is prompt. Each segment is tokenized on its own, with
special-token strings mapped to their ids.

Without a chat template the plain template below is used (documented here because it is a format):

    <bos>System: {system}\\n\\nUser: {user}\\n\\nAssistant: {reply}<eos>\\n\\nUser: ...

where only `{reply}<eos>` is trained.

Samples are packed to `seq_length` (whole conversations, in order, several per sample; attention does not
cross conversation boundaries) or padded (one conversation per sample). Conversations longer than a sample are
truncated (counted).

What packing guarantees in training (`llamapro train --sft`): the block-diagonal `attention_mask` is applied by
megatron-core's local spec (its softmax takes an explicit mask); Transformer Engine's causal attention ignores
it, so the trainer refuses packing there. `position_ids` restart per conversation, but megatron-core's GPTModel
computes RoPE from 0..s-1 whatever the ids: a packed conversation sees shifted positions, which attention does
not notice (RoPE scores depend on position differences only) - the loss equals the one of each conversation
alone up to rounding (tests/distributed/test_sft.py: 7e-8 relative). The label that links two conversations
is the next one's first token, which is never trained (not even when a conversation opens with an assistant
turn), exactly as in padded samples, where a conversation's first token is never a label.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llamapro_megatron.errors import UserError

ROLES = ("system", "user", "assistant")
PLAIN_PREFIX = {"system": "System: ", "user": "User: ", "assistant": "Assistant: "}
PLAIN_SEPARATOR = "\n\n"


@dataclass
class Conversation:
    """Token ids of one conversation and its loss mask (1 where the token is assistant output)."""

    ids: np.ndarray
    mask: np.ndarray


def validate_messages(messages, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise UserError(f"{where}: each message needs a role in {ROLES} and a string content, got {m!r:.80}")
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(f"{where}: no assistant message, nothing to train on")
    return messages


def chat_segments(tokenizer, messages: list[dict]) -> list[tuple[str, bool]]:
    """(text, trained) pieces whose concatenation is the rendered conversation."""
    if not tokenizer.chat_template:
        return _plain_segments(tokenizer, messages)
    segments: list[tuple[str, bool]] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            prompt = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True) if i else ""
            full = tokenizer.apply_chat_template(messages[: i + 1])
            if not prompt.startswith(done) or not full.startswith(prompt):
                raise UserError(
                    f"chat template of {tokenizer.path} is not prefix-stable (rendering more messages changes "
                    "earlier text), so assistant tokens cannot be located; use a template without that behaviour"
                )
            segments += [(prompt[len(done) :], False), (full[len(prompt) :], True)]
        else:
            full = tokenizer.apply_chat_template(messages[: i + 1])
            if not full.startswith(done):
                raise UserError(f"chat template of {tokenizer.path} is not prefix-stable; see the SFT docs")
            segments.append((full[len(done) :], False))
        done = full
    return [(text, trained) for text, trained in segments if text]


def _plain_segments(tokenizer, messages: list[dict]) -> list[tuple[str, bool]]:
    bos = tokenizer.special_text(tokenizer.bos)
    eos = tokenizer.special_text(tokenizer.eos)
    segments: list[tuple[str, bool]] = [(bos, False)] if bos else []
    for m in messages:
        if m["role"] == "assistant":
            segments += [(PLAIN_PREFIX["assistant"], False), (m["content"] + eos, True), (PLAIN_SEPARATOR, False)]
        else:
            segments.append((PLAIN_PREFIX[m["role"]] + m["content"] + PLAIN_SEPARATOR, False))
    return segments


def encode_conversation(tokenizer, messages: list[dict]) -> Conversation:
    ids: list[int] = []
    mask: list[int] = []
    for text, trained in chat_segments(tokenizer, messages):
        piece = tokenizer.encode_with_special_tokens(text)
        ids += piece
        mask += [int(trained)] * len(piece)
    return Conversation(np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=np.int8))


def read_conversations(
    paths: Iterable[str | Path], tokenizer, strict: bool = False, log: Callable[[str], None] | None = None
) -> list[Conversation]:
    """Chat jsonl (`{"messages": [{"role", "content"}, ...]}` per line) -> encoded conversations.

    Bad lines are reported with file and line and skipped (`strict`: fatal), like `llamapro preprocess`.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    conversations = []
    for path in map(Path, paths):
        if not path.is_file():
            raise UserError(f"SFT data {path}: no such file; pass chat .jsonl files with a 'messages' list per line")
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{line_no}"
                try:
                    record = json.loads(line)
                    if not isinstance(record, dict):
                        raise UserError(f"{where}: expected a JSON object with 'messages'")
                    messages = validate_messages(record.get("messages"), where)
                except (json.JSONDecodeError, UserError) as e:
                    message = f"{where}: invalid JSON ({e.msg})" if isinstance(e, json.JSONDecodeError) else str(e)
                    if strict:
                        raise UserError(message) from None
                    log(message + "; skipped")
                    continue
                conversations.append(encode_conversation(tokenizer, messages))
    return conversations


@dataclass
class PackedSample:
    ids: np.ndarray  # seq_length + 1 ids (inputs are ids[:-1], labels ids[1:])
    mask: np.ndarray  # 1 where ids[j] is a trained (assistant) token
    starts: list[int]  # where each conversation begins in ids
    used: int  # ids that are real tokens (the rest is padding)


def pack(conversations: list[Conversation], seq_length: int, pad_id: int, packed: bool = True) -> tuple[list, int]:
    """Greedy in-order packing (or one conversation per sample). Returns (samples, truncated count)."""
    width = seq_length + 1
    samples: list[PackedSample] = []
    truncated = 0
    current: list[Conversation] = []
    used = 0

    def flush() -> None:
        nonlocal current, used
        if not current:
            return
        ids = np.full(width, pad_id, dtype=np.int64)
        mask = np.zeros(width, dtype=np.int8)
        starts, at = [], 0
        for c in current:
            starts.append(at)
            ids[at : at + len(c.ids)] = c.ids
            mask[at : at + len(c.mask)] = c.mask
            mask[at] = 0  # a conversation's first token has no context of its own: never a label (no leak)
            at += len(c.ids)
        samples.append(PackedSample(ids, mask, starts, at))
        current, used = [], 0

    for c in conversations:
        if len(c.ids) > width:
            c = Conversation(c.ids[:width], c.mask[:width])
            truncated += 1
        if not packed or used + len(c.ids) > width:
            flush()
        current.append(c)
        used += len(c.ids)
    flush()
    return samples, truncated


class SFTDataset:
    """torch-style dataset of SFT samples; items match megatron-core GPTDataset's keys.

    tokens/labels (int64 [s]), loss_mask (float32 [s]: 1 where the label is an assistant token),
    position_ids (restart at each packed conversation) and attention_mask (bool [1, s, s], True = masked,
    megatron-core's convention; block-diagonal causal over packed conversations).
    """

    def __init__(
        self,
        paths: Iterable[str | Path],
        tokenizer,
        seq_length: int,
        packed: bool = True,
        strict: bool = False,
        log: Callable[[str], None] | None = None,
    ) -> None:
        if seq_length < 2:
            raise UserError(f"SFT seq_length {seq_length}: expected at least 2")
        self.tokenizer = tokenizer
        self.seq_length = seq_length
        conversations = read_conversations(paths, tokenizer, strict=strict, log=log)
        if not conversations:
            raise UserError(f"SFT data {list(map(str, paths))}: no usable conversations")
        self.pad_id = tokenizer.pad if tokenizer.pad >= 0 else tokenizer.eod
        self.samples, self.truncated = pack(conversations, seq_length, self.pad_id, packed=packed)
        self.num_conversations = len(conversations)
        if self.truncated:
            (log or (lambda m: print(m, file=sys.stderr)))(
                f"SFT: {self.truncated} of {len(conversations)} conversations longer than {seq_length + 1} tokens "
                "were truncated"
            )

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, idx: int) -> dict:
        import torch

        s = self.samples[idx]
        n = self.seq_length
        tokens = torch.from_numpy(s.ids[:n].copy())
        labels = torch.from_numpy(s.ids[1:].copy())
        loss_mask = torch.from_numpy(s.mask[1:].astype(np.float32))
        position_ids = torch.arange(n)
        segment = torch.zeros(n, dtype=torch.long)
        for k, start in enumerate(s.starts[1:], start=1):
            position_ids[start:] -= position_ids[start].clone()
            segment[start:] = k
        causal = torch.tril(torch.ones(n, n, dtype=torch.bool))
        allowed = causal & (segment[:, None] == segment[None, :])
        return {
            "tokens": tokens,
            "labels": labels,
            "loss_mask": loss_mask,
            "position_ids": position_ids,
            "attention_mask": (~allowed).unsqueeze(0),
        }
