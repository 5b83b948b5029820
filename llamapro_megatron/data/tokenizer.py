"""One tokenizer interface over SentencePiece models and Hugging Face `tokenizer.json` files.

It is what megatron-core's GPTDataset needs (`vocab_size`, `eod`, `pad`, `unique_identifiers`) plus what
preprocessing and SFT need (`tokenize`, `batch_encode`, `detokenize`, bos/eos, chat template).
SentencePiece models (LLaMA-1/2, Mistral) are run by `sentencepiece` itself, as Megatron does
(transformers' LlamaTokenizer does not match it exactly); `tokenizer.json` (Llama-3, SmolLM2) by
`tokenizers`. `tokenize` never adds BOS/EOS: callers decide (`--prepend-bos`, `--append-eod`).
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llamapro_megatron.errors import UserError
from llamapro_megatron.runtime.compat import load_megatron_core

# a bare megatron-core import would compile its fusion helpers (TorchDynamo: ~3 s per preprocessing worker)
load_megatron_core()
try:  # megatron-core >= 0.14: GPTDatasetConfig.tokenizer is typed as this base class.
    from megatron.core.tokenizers import MegatronTokenizerBase as _Base
except ImportError:  # pragma: no cover - older or newer layouts: duck typing is all GPTDataset needs
    _Base = object

SENTENCEPIECE = "sentencepiece"
HUGGINGFACE = "huggingface"
GGUF_MAGIC = b"GGUF"

# File names looked for in a directory, in order of preference. A LLaMA-2 HF directory has both
# tokenizer.model and tokenizer.json: the SentencePiece model is the original, so it wins.
_DIR_CANDIDATES = ("tokenizer.model", "tokenizer.json", "spiece.model")


def detect_kind(path: Path) -> str:
    """Tell a tokenizer file's kind from its content (whatever it is called)."""
    with open(path, "rb") as f:
        head = f.read(64)
    if head[:4] == GGUF_MAGIC:
        return "gguf"
    if head.lstrip()[:1] == b"{":
        return HUGGINGFACE
    from sentencepiece import SentencePieceProcessor

    try:
        SentencePieceProcessor(model_file=str(path))
    except Exception as e:  # sentencepiece raises RuntimeError/OSError on non-models
        raise UserError(
            f"--tokenizer {path}: not a SentencePiece model, a tokenizer.json or a gguf file ({e}); "
            "pass a Hugging Face tokenizer directory or one of those files"
        ) from None
    return SENTENCEPIECE


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json spells special tokens as strings or as AddedToken dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: cannot read it as JSON ({e}); fix or remove the file") from None


def _read_config(directory: Path | None) -> dict:
    """Special tokens and chat template from tokenizer_config.json (+ special_tokens_map.json, chat_template.*)."""
    if directory is None:
        return {}
    config: dict = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        if (directory / name).is_file():
            config.update(_read_json(directory / name))
    if not config.get("chat_template"):
        if (directory / "chat_template.jinja").is_file():  # transformers >= 4.50 writes it separately
            config["chat_template"] = (directory / "chat_template.jinja").read_text(encoding="utf-8")
        elif (directory / "chat_template.json").is_file():
            config["chat_template"] = _read_json(directory / "chat_template.json").get("chat_template")
    template = config.get("chat_template")
    if isinstance(template, list):  # a list of named templates: use the default one
        named = {t.get("name"): t.get("template") for t in template}
        config["chat_template"] = named.get("default") or next(iter(named.values()), None)
    return config


class Tokenizer(_Base):
    """A loaded tokenizer; build it with `load_tokenizer`."""

    def __init__(self, path: Path, kind: str, backend: Any, config: dict) -> None:
        self.path = path
        self.kind = kind
        self._backend = backend
        self.chat_template: str | None = config.get("chat_template") or None
        self.add_bos_token: bool = bool(config.get("add_bos_token", kind == SENTENCEPIECE))
        if kind == SENTENCEPIECE:
            self._vocab_size = backend.get_piece_size()
            self._bos = backend.bos_id()
            self._eos = backend.eos_id()
            self._pad = backend.pad_id()
            self._unk = backend.unk_id()
        else:
            self._vocab_size = backend.get_vocab_size(with_added_tokens=True)
            self._bos = self._eos = self._pad = self._unk = -1
        # tokenizer_config.json overrides what the model file says (e.g. Llama-3 instruct's eos).
        for attr, key in (("_bos", "bos_token"), ("_eos", "eos_token"), ("_pad", "pad_token"), ("_unk", "unk_token")):
            text = _token_text(config.get(key))
            if text is not None:
                token_id = self.token_to_id(text)
                if token_id is None:
                    raise UserError(
                        f"{path}: {key} {text!r} in tokenizer_config.json is not in the vocabulary; "
                        "fix tokenizer_config.json"
                    )
                setattr(self, attr, token_id)
        if kind == HUGGINGFACE and self._eos < 0:
            self._guess_hf_specials()
        self.special_tokens = self._collect_special_tokens()
        self.unique_identifiers = OrderedDict(
            [("class", type(self).__name__), ("kind", kind), ("tokenizer_path", str(path))]
        )

    def _guess_hf_specials(self) -> None:
        """A bare tokenizer.json has no bos/eos fields: use the well-known special token names."""
        for attr, names in (
            ("_bos", ("<|begin_of_text|>", "<s>", "<|endoftext|>", "<|im_start|>")),
            ("_eos", ("<|end_of_text|>", "</s>", "<|endoftext|>", "<|im_end|>")),
        ):
            if getattr(self, attr) < 0:
                for name in names:
                    token_id = self._backend.token_to_id(name)
                    if token_id is not None:
                        setattr(self, attr, token_id)
                        break

    def _collect_special_tokens(self) -> dict[str, int]:
        """Control/added tokens that may appear literally in chat-template output."""
        specials: dict[str, int] = {}
        if self.kind == SENTENCEPIECE:
            sp = self._backend
            for i in range(sp.get_piece_size()):
                if sp.is_control(i):
                    specials[sp.id_to_piece(i)] = i
        else:
            for token_id, added in self._backend.get_added_tokens_decoder().items():
                if added.special:
                    specials[added.content] = token_id
        return specials

    # --- megatron-core's tokenizer interface -------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eod(self) -> int:
        """End of document: the EOS token."""
        return self._eos

    @property
    def eos(self) -> int:
        return self._eos

    @property
    def bos(self) -> int:
        return self._bos

    @property
    def pad(self) -> int:
        """-1 when the vocabulary has none (LLaMA); megatron-core then pads with its own -1."""
        return self._pad

    @property
    def unk(self) -> int:
        return self._unk

    @property
    def vocab(self) -> dict[str, int]:
        if self.kind == SENTENCEPIECE:
            return {self._backend.id_to_piece(i): i for i in range(self._vocab_size)}
        return self._backend.get_vocab(with_added_tokens=True)

    @property
    def inv_vocab(self) -> dict[int, str]:
        return {i: t for t, i in self.vocab.items()}

    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS. Special-token strings in the text are plain text."""
        if self.kind == SENTENCEPIECE:
            return self._backend.encode(text)
        return self._backend.encode(text, add_special_tokens=False).ids

    def batch_encode(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        """`tokenize` of each text; the backends' own batch paths (native threads when num_threads > 1)."""
        texts = list(texts)
        if self.kind == SENTENCEPIECE:
            return self._backend.encode(texts, num_threads=num_threads)
        encodings = (
            self._backend.encode_batch(texts, add_special_tokens=False)
            if num_threads > 1
            else [self._backend.encode(t, add_special_tokens=False) for t in texts]
        )
        return [e.ids for e in encodings]

    def detokenize(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        if self.kind == SENTENCEPIECE:
            return self._backend.decode(ids)
        return self._backend.decode(ids, skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        if self.kind == SENTENCEPIECE:
            token_id = self._backend.piece_to_id(token)
            unknown = token_id == self._backend.unk_id() and token != self._backend.id_to_piece(token_id)
            return None if unknown else token_id
        return self._backend.token_to_id(token)

    def encode_with_special_tokens(self, text: str) -> list[int]:
        """Like `tokenize`, but special-token strings (e.g. `<|im_start|>`, `</s>`) become their ids.

        Used on chat-template output. Each stretch of text between special tokens is tokenized on its own
        (for SentencePiece this adds the dummy-prefix space to each stretch, like transformers' legacy
        LlamaTokenizer).
        """
        if not self.special_tokens:
            return self.tokenize(text)
        pattern = "(" + "|".join(re.escape(s) for s in sorted(self.special_tokens, key=len, reverse=True)) + ")"
        ids: list[int] = []
        for part in re.split(pattern, text):
            if part in self.special_tokens:
                ids.append(self.special_tokens[part])
            elif part:
                ids.extend(self.tokenize(part))
        return ids

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """Render messages with the tokenizer's chat template (Hugging Face's Jinja conventions)."""
        if not self.chat_template:
            raise UserError(
                f"tokenizer {self.path} has no chat template; add `chat_template` to tokenizer_config.json "
                "or use the plain template (llamapro_megatron.data.sft.PLAIN_TEMPLATE)"
            )
        return render_chat_template(
            self.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.special_text(self._bos),
            eos_token=self.special_text(self._eos),
        )

    def special_text(self, token_id: int) -> str:
        """The text of a special token id ("" for -1), as chat templates spell it."""
        if token_id < 0:
            return ""
        if self.kind == SENTENCEPIECE:
            return self._backend.id_to_piece(token_id)
        return self._backend.id_to_token(token_id) or ""

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, path={str(self.path)!r}, vocab_size={self.vocab_size})"

    def __getstate__(self) -> dict:
        # Backends don't pickle (worker processes): reload from the path instead.
        return {"path": self.path, "source": self._source}

    def __setstate__(self, state: dict) -> None:
        other = load_tokenizer(state["source"])
        self.__dict__.update(other.__dict__)


def render_chat_template(template: str, messages: list[dict], add_generation_prompt: bool = False, **extra) -> str:
    """Render a Hugging Face chat template (sandboxed Jinja, as transformers does)."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **extra)


def _find_in_directory(directory: Path) -> Path:
    for name in _DIR_CANDIDATES:
        if (directory / name).is_file():
            return directory / name
    raise UserError(
        f"--tokenizer {directory}: no tokenizer.model or tokenizer.json in this directory; "
        "pass a Hugging Face model directory or the tokenizer file itself"
    )


def _hf_backend(file: Path):
    from tokenizers import Tokenizer as HFTokenizer

    try:
        backend = HFTokenizer.from_file(str(file))
    except Exception as e:
        raise UserError(f"--tokenizer {file}: not a valid tokenizer.json ({e})") from None
    # Documents are plain text: a literal "<|endoftext|>" in a corpus must not become the special token
    # (SentencePiece never parses control tokens either). Chat templates use `encode_with_special_tokens`, which
    # maps them explicitly.
    backend.encode_special_tokens = True
    return backend


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer from a Hugging Face directory, a SentencePiece model, a tokenizer.json or a llama.cpp gguf
    vocabulary (SentencePiece "llama" ones rebuilt exactly; byte-level BPE "gpt2" ones, e.g. Llama-3 or Qwen2,
    through transformers' GGUF converter).

    The kind is detected from the file's content. Special tokens and the chat template come from
    tokenizer_config.json next to the file when there is one.
    """
    source = Path(path)
    if not source.exists():
        raise UserError(f"--tokenizer {source}: no such file or directory; pass a tokenizer directory or file")
    file = _find_in_directory(source) if source.is_dir() else source
    config = _read_config(file.parent)
    kind = detect_kind(file)
    if kind == "gguf":
        from llamapro_megatron.data import gguf_vocab

        converted = gguf_vocab.cached_conversion(file)  # only byte-level BPE vocabularies are converted
        reader = None if converted else gguf_vocab.read_fields(file)  # parsed once: seconds for a large vocabulary
        if reader is not None and gguf_vocab.vocabulary_model(file, reader) == "gpt2":  # its tokenizer.json
            converted = gguf_vocab.cached_hf_tokenizer_dir(file)  # by transformers, which reads the file itself
        if converted is not None:
            backend = _hf_backend(converted / "tokenizer.json")
            config = {**_read_config(converted), **config}  # a tokenizer_config.json beside the gguf wins
            kind = HUGGINGFACE
        else:
            from sentencepiece import SentencePieceProcessor

            backend = SentencePieceProcessor(model_proto=gguf_vocab.sentencepiece_model_from_gguf(file, reader))
            kind = SENTENCEPIECE
    elif kind == SENTENCEPIECE:
        from sentencepiece import SentencePieceProcessor

        backend = SentencePieceProcessor(model_file=str(file))
    else:
        backend = _hf_backend(file)
    tokenizer = Tokenizer(file, kind, backend, config)
    tokenizer._source = source
    return tokenizer
