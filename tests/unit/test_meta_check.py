"""llamapro.json is checked against its schema (checkpoint/meta_check.py): what the project writes reads back equal;
each kind of damage is refused with one UserError naming the file and the field."""
from __future__ import annotations

import copy
import json

import pytest

from llamapro_megatron.arch import LlamaArch
from llamapro_megatron.checkpoint.mcore import CheckpointMeta, read_meta
from llamapro_megatron.errors import UserError
from llamapro_megatron.expansion import compose, plan_from_args
from tests.tiny_models import VARIANTS


def _arch(variant: str) -> LlamaArch:
    config = {k: v for k, v in VARIANTS[variant].items() if k != "kind"}
    return LlamaArch.from_hf_config({"architectures": ["LlamaForCausalLM"], "eos_token_id": [2, 3], **config})


def _expanded() -> CheckpointMeta:
    plan = plan_from_args(4, groups=2)
    arch = _arch("llama31").replace(num_layers=plan.num_layers)
    return CheckpointMeta(arch=arch, padded_vocab_size=384, dtype="bfloat16", layout={"tp": 2, "pp": 1, "vpp": None},
                          source={"hf_dir": "/models/x"}, expansion=compose(None, plan), iteration=500,
                          trainable_only={"base": "/ckpt/pro/release", "fingerprint": "sha256:" + "0" * 64,
                                          "keys": ["decoder.layers.2.mlp.linear_fc2.weight"]})


@pytest.mark.parametrize("make", [lambda: CheckpointMeta(arch=_arch("gqa"), padded_vocab_size=256, dtype="float32",
                                                         layout={"tp": 1, "pp": 1, "vpp": None}), _expanded])
def test_what_the_project_writes_reads_back_equal(tmp_path, make):
    meta = make()
    (tmp_path / "llamapro.json").write_text(meta.to_json())
    assert read_meta(tmp_path) == meta


def _set(path: str, value):
    def change(d):
        *parents, last = path.split(".")
        for p in parents:
            d = d[p]
        if value is _DROP:
            del d[last]
        else:
            d[last] = value
    return change


_DROP = object()
# (change to the JSON of an expanded, trainable-only save, the field path the message names, words it says)
DAMAGE = [
    (_set("format", "something-else"), "format", "llamapro-megatron"),
    (_set("arch", "llama"), "arch", "expected an object"),
    (_set("arch.num_layers", "6"), "arch.num_layers", "expected an integer"),
    (_set("arch.num_layers", 6.0), "arch.num_layers", "expected an integer"),
    (_set("arch.hidden_size", 0), "arch.hidden_size", "must be positive"),
    (_set("arch.num_query_groups", 3), "arch.num_query_groups", "does not divide"),
    (_set("arch.tie_word_embeddings", 1), "arch.tie_word_embeddings", "true/false"),
    (_set("arch.architecture", "GPT2LMHeadModel"), "arch.architecture", "not a LLaMA-family model"),
    (_set("arch.rope_scaling.factor", -4.0), "arch.rope_scaling.factor", "must be positive"),
    (_set("arch.rope_scaling.shift", 1), "arch.rope_scaling", "unknown field(s) shift"),
    (_set("arch.rope_scaling.rope_type", "yarn"), "arch.rope_scaling.rope_type", "is not one of llama3, linear"),
    (_set("arch.rope_scaling.low_freq_factor", None), "arch.rope_scaling.low_freq_factor", "required for llama3"),
    (_set("arch.eos_token_id", "2"), "arch.eos_token_id", "an integer or a list or null"),
    (_set("arch.head_dim", _DROP), "arch.head_dim", "required field is missing"),
    (_set("arch.__class__", "os.system"), "arch", "unknown field(s) __class__"),
    (_set("padded_vocab_size", 100), "padded_vocab_size", "smaller than arch.vocab_size"),
    (_set("dtype", "float64"), "dtype", "is not one of"),
    (_set("layout.tp", 0), "layout.tp", "positive integer"),
    (_set("layout.zp", 2), "layout", "unknown field(s) zp"),
    (_set("iteration", -1), "iteration", "must not be negative"),
    (_set("expansion.num_layers", 7), "expansion.num_layers", "but arch.num_layers is 6"),
    (_set("expansion.new_layer_indices", [2, 9]), "expansion.new_layer_indices", "distinct layer numbers"),
    (_set("expansion.new_layer_indices", [5, 2]), "expansion.new_layer_indices", "in order"),
    (_set("expansion.new_layer_indices", [2]), "expansion.new_layer_indices", "1 new layers"),
    (_set("expansion.layer_origins", [0, 1, 1, 2, 3, 3, 3]), "expansion.layer_origins", "for each of the 6"),
    (_set("expansion.source_of_new", {"2": 60}), "expansion.source_of_new.2", "must map a layer"),
    (_set("expansion.original_num_layers", _DROP), "expansion.original_num_layers", "required field is missing"),
    (_set("trainable_only.fingerprint", "md5:00"), "trainable_only.fingerprint", "sha256"),
    (_set("trainable_only.keys", "all"), "trainable_only.keys", "expected a list"),
    (_set("trainable_only.base", _DROP), "trainable_only.base", "required field is missing"),
    (_set("surprise", True), "", "unknown field(s) surprise"),
]


@pytest.mark.parametrize("change,field,words", DAMAGE, ids=[f"{i}-{d[1] or 'top'}" for i, d in enumerate(DAMAGE)])
def test_damage_is_refused_naming_the_field(tmp_path, change, field, words):
    d = json.loads(_expanded().to_json())
    change(d)
    (tmp_path / "llamapro.json").write_text(json.dumps(d))
    with pytest.raises(UserError) as e:
        read_meta(tmp_path)
    text = str(e.value)
    assert text.startswith(f"{tmp_path / 'llamapro.json'} is not valid llamapro-megatron metadata: {field}"), text
    assert words in text and "\n" not in text


@pytest.mark.parametrize("text", ["", "{", "[1, 2]", "null", '"llamapro"'])
def test_not_json_or_not_an_object_is_refused(tmp_path, text):
    (tmp_path / "llamapro.json").write_text(text)
    with pytest.raises(UserError, match="llamapro.json is not valid"):
        read_meta(tmp_path)


def test_the_check_does_not_change_the_json_it_reads():
    d = json.loads(_expanded().to_json())
    before = copy.deepcopy(d)
    CheckpointMeta.from_json(json.dumps(d))
    assert d == before
