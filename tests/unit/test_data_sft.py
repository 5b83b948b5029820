"""SFT samples on real tokenizers: only assistant tokens count in the loss."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from llamapro_megatron.data.sft import SFTDataset, encode_conversation
from llamapro_megatron.data.tokenizer import load_tokenizer
from llamapro_megatron.errors import UserError
from tests.data_artifacts import artifact, smollm2_tokenizer_dir

CHAT = [
    {"role": "system", "content": "You solve competition math problems step by step."},
    {"role": "user", "content": "What is the sum of the first 10 positive odd integers?"},
    {"role": "assistant", "content": "The sum of the first n odd integers is n^2, so the answer is 100."},
    {"role": "user", "content": "And of the first 12?"},
    {"role": "assistant", "content": "12^2 = 144."},
]


@pytest.fixture(scope="module")
def smollm2():
    return load_tokenizer(smollm2_tokenizer_dir())


def test_masked_positions_are_exactly_the_prompt_tokens_chat_template(smollm2):
    """Independent reference: tokenize the whole rendered conversation with `tokenizers` (special tokens
    parsed, character offsets kept) and mark the tokens inside each assistant reply + its end-of-turn."""
    import tokenizers

    assert smollm2.chat_template and "<|im_start|>" in smollm2.chat_template
    conv = encode_conversation(smollm2, CHAT)
    text = smollm2.apply_chat_template(CHAT)
    reference = tokenizers.Tokenizer.from_file(str(smollm2_tokenizer_dir() / "tokenizer.json"))
    enc = reference.encode(text, add_special_tokens=False)
    spans, at = [], 0
    for m in CHAT:
        if m["role"] == "assistant":
            start = text.index(m["content"] + "<|im_end|>", at)
            at = start + len(m["content"] + "<|im_end|>\n")
            spans.append((start, at))
    expected = [int(any(s <= a and b <= e for s, e in spans)) for a, b in enc.offsets]
    assert conv.ids.tolist() == enc.ids
    assert conv.mask.tolist() == expected
    trained = smollm2.detokenize(conv.ids[conv.mask == 1])
    assert trained == "".join(m["content"] + "<|im_end|>\n" for m in CHAT if m["role"] == "assistant")


def test_plain_template_on_sentencepiece():
    import sentencepiece

    tok = load_tokenizer(artifact("tokenizer.model.v1"))  # Mistral's model, no chat template
    assert tok.chat_template is None
    conv = encode_conversation(tok, CHAT)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(artifact("tokenizer.model.v1")))
    replies = [m["content"] for m in CHAT if m["role"] == "assistant"]
    assert conv.ids[conv.mask == 1].tolist() == sp.encode(replies[0]) + [2] + sp.encode(replies[1]) + [2]
    assert conv.ids[0] == tok.bos and conv.mask[0] == 0
    prompt = tok.detokenize(conv.ids[conv.mask == 0])
    assert "System: You solve" in prompt and "User: And of the first 12?" in prompt and "12^2" not in prompt


def write_chats(path: Path, n: int) -> Path:
    lines = []
    for i in range(n):
        lines.append(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": f"Problem {i}: compute {i} + {i}."},
                        {"role": "assistant", "content": f"{i} + {i} = {2 * i}." + " Indeed." * (i % 4)},
                    ]
                }
            )
        )
    lines += ["{broken", json.dumps({"messages": [{"role": "user", "content": "no reply"}]})]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_packed_dataset(tmp_path: Path, smollm2):
    messages: list[str] = []
    src = write_chats(tmp_path / "chat.jsonl", 40)
    ds = SFTDataset([src], smollm2, seq_length=128, packed=True, log=messages.append)
    assert ds.num_conversations == 40 and ds.truncated == 0
    assert [m.split(": ")[0] for m in messages] == [f"{src}:41", f"{src}:42"]
    single = [encode_conversation(smollm2, json.loads(line)["messages"]) for line in src.read_text().splitlines()[:40]]
    assert len(ds) < 40  # several conversations per sample
    total_trained = 0
    for i in range(len(ds)):
        item = ds[i]
        s = ds.samples[i]
        assert item["tokens"].shape == (128,) and item["attention_mask"].shape == (1, 128, 128)
        assert item["tokens"][1:].tolist() == item["labels"][:-1].tolist()
        for k, start in enumerate(s.starts):
            if start < 128:
                assert item["position_ids"][start] == 0
            if k and start < 128:  # no attention across conversations
                assert bool(item["attention_mask"][0, start, start - 1])
        total_trained += int(item["loss_mask"].sum())
    # Every assistant token is a label exactly once (the first token of a conversation is never trained).
    assert total_trained == sum(int(c.mask.sum()) for c in single)


def test_padded_dataset_and_errors(tmp_path: Path):
    tok = load_tokenizer(artifact("tokenizer.model.v1"))
    src = write_chats(tmp_path / "chat.jsonl", 5)
    ds = SFTDataset([src], tok, seq_length=64, packed=False, log=lambda m: None)
    assert len(ds) == 5
    item = ds[0]
    used = ds.samples[0].used
    assert item["tokens"][used:].tolist() == [tok.eod] * (64 - used)  # Mistral has no pad: EOS pads
    assert item["loss_mask"][used - 1 :].sum() == 0
    with pytest.raises(UserError, match=r"chat.jsonl:6: invalid JSON"):
        SFTDataset([src], tok, seq_length=64, strict=True)
    short = SFTDataset([src], tok, seq_length=8, packed=False, log=lambda m: None)
    assert short.truncated == 5 and np.all([len(s.ids) == 9 for s in short.samples])


def test_packed_boundary_label_is_never_trained(tmp_path: Path, smollm2):
    """The label linking two packed conversations (the next one's first token) is not trained, even when that
    conversation opens with an assistant turn (then its first token is assistant text)."""
    src = tmp_path / "chat.jsonl"
    opening = [{"role": "assistant", "content": "Hello! Ask me a math question."}]
    src.write_text(json.dumps({"messages": CHAT}) + "\n" + json.dumps({"messages": opening}) + "\n")
    assert encode_conversation(smollm2, opening).mask[0] == 1
    ds = SFTDataset([src], smollm2, seq_length=256, packed=True)
    assert len(ds) == 1 and len(ds.samples[0].starts) == 2
    start = ds.samples[0].starts[1]
    item = ds[0]
    assert item["loss_mask"][start - 1] == 0 and item["loss_mask"][start] == 1  # labels: ids[start], ids[start+1]
