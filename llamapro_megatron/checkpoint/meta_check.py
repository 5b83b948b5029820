"""`llamapro.json` is checked, not trusted: every field's type (from the dataclasses that define it, the one source
of truth) and the facts the loaders rely on (positive sizes, a known dtype, layer indices inside the model).

A checkpoint comes from anywhere (a colleague, a bucket, a hub); a wrong value here would otherwise surface as a
shape error deep inside megatron-core, or build the wrong model. The first problem found is reported as one
:class:`~llamapro_megatron.errors.UserError` naming the file and the JSON path of the field.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from llamapro_megatron.arch import DTYPES, ROPE_TYPES, SUPPORTED_ARCHITECTURES
from llamapro_megatron.errors import UserError

FORMAT = "llamapro-megatron"


class _Bad(Exception):
    def __init__(self, where: str, what: str):
        super().__init__(f"{where}: {what}")


def _type_name(hint: Any) -> str:
    if hint is type(None):
        return "null"
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    origin = typing.get_origin(hint)
    if origin is not None:
        return {list: "a list", dict: "an object"}.get(origin, str(origin))
    if dataclasses.is_dataclass(hint):
        return "an object"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(hint, str(hint))


def _matches(value: Any, hint: Any, where: str) -> None:
    """Raise _Bad unless the JSON value has the type `hint` describes (recursively)."""
    if hint is Any:
        return
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return
        others = [o for o in options if o is not type(None)]
        if len(others) == 1:  # `X | None`: what is wrong with it as an X
            _matches(value, others[0], where)
            return
        for option in others:
            try:
                _matches(value, option, where)
                return
            except _Bad:
                continue
        raise _Bad(where, f"expected {_type_name(hint)}, got {value!r:.60}")
    ok = {
        type(None): value is None,
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(hint)
    if ok is not None:
        if not ok:
            raise _Bad(where, f"expected {_type_name(hint)}, got {value!r:.60}")
        return
    if origin is list:
        if not isinstance(value, list):
            raise _Bad(where, f"expected a list, got {value!r:.60}")
        (item,) = typing.get_args(hint) or (Any,)
        for i, v in enumerate(value):
            _matches(v, item, f"{where}[{i}]")
        return
    if origin is dict:
        if not isinstance(value, dict):
            raise _Bad(where, f"expected an object, got {value!r:.60}")
        _, item = typing.get_args(hint) or (str, Any)
        for k, v in value.items():
            _matches(v, item, f"{where}.{k}")
        return
    if dataclasses.is_dataclass(hint):
        _fields(value, hint, where)
        return
    raise TypeError(f"meta_check: no rule for {hint!r}")  # a new field type: teach _matches about it


def _object(value: Any, where: str, required: dict[str, Any], optional: dict[str, Any] | None = None,
            closed: bool = True, ignore: tuple[str, ...] = ()) -> None:
    """`value` is a JSON object with every `required` field and any `optional` one, each of its type hint; `closed`:
    and no other field (but `ignore`)."""
    optional = optional or {}
    if not isinstance(value, dict):
        raise _Bad(where, f"expected an object, got {value!r:.60}")
    unknown = sorted(set(value) - set(required) - set(optional) - set(ignore)) if closed else []
    if unknown:
        raise _Bad(where, f"unknown field(s) {', '.join(unknown)}")
    for name, hint in {**required, **optional}.items():
        sub = f"{where}.{name}" if where else name
        if name in value:
            _matches(value[name], hint, sub)
        elif name in required:
            raise _Bad(sub, "required field is missing")


def _fields(value: Any, cls: type, where: str, ignore: tuple[str, ...] = ()) -> None:
    """`value` is a JSON object with exactly `cls`'s fields (those without defaults required), each of its type."""
    hints = typing.get_type_hints(cls)
    required, optional = {}, {}
    for f in dataclasses.fields(cls):
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        (optional if has_default else required)[f.name] = hints[f.name]
    _object(value, where, required, optional, ignore=ignore)


def _positive(d: dict, names: tuple[str, ...], where: str) -> None:
    for name in names:
        if d.get(name) is not None and not d[name] > 0:
            raise _Bad(f"{where}.{name}", f"must be positive, got {d[name]!r}")


def _check_arch(a: dict) -> None:
    if a["architecture"] not in SUPPORTED_ARCHITECTURES:
        raise _Bad("arch.architecture", f"{a['architecture']!r} is not a LLaMA-family model; supported: "
                                        f"{sorted(SUPPORTED_ARCHITECTURES)}")
    _positive(a, ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                  "head_dim", "vocab_size", "max_position_embeddings", "rms_norm_eps", "rope_theta",
                  "sliding_window"), "arch")
    if a["num_attention_heads"] % a["num_query_groups"]:
        raise _Bad("arch.num_query_groups", f"{a['num_query_groups']} does not divide num_attention_heads="
                                            f"{a['num_attention_heads']}")
    if a.get("dtype", "float32") not in DTYPES.values():
        raise _Bad("arch.dtype", f"{a['dtype']!r} is not one of {sorted(set(DTYPES.values()))}")
    scaling = a.get("rope_scaling")
    if scaling is not None:
        _positive(scaling, ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
                  "arch.rope_scaling")
        kind = scaling.get("rope_type", "llama3")
        if kind not in ROPE_TYPES:
            raise _Bad("arch.rope_scaling.rope_type", f"{kind!r} is not one of {', '.join(ROPE_TYPES)}")
        for name in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if kind == "llama3" and scaling.get(name) is None:
                raise _Bad(f"arch.rope_scaling.{name}", "required for llama3 rope scaling")


def _check_layers(d: dict) -> None:
    num_layers = d["arch"]["num_layers"]
    x = d.get("expansion")
    if x is None:
        return
    _object(x, "expansion", {"original_num_layers": int, "num_layers": int, "new_layer_indices": list[int],
                             "source_of_new": dict[str, int], "layer_origins": list[int]},
            {"history": list[dict[str, Any]]}, closed=False)
    if x["num_layers"] != num_layers:
        raise _Bad("expansion.num_layers", f"{x['num_layers']} but arch.num_layers is {num_layers}")
    if not 0 < x["original_num_layers"] <= num_layers:
        raise _Bad("expansion.original_num_layers", f"{x['original_num_layers']} is not in 1..{num_layers}")
    new = x["new_layer_indices"]
    if new != sorted(set(new)) or any(not 0 <= i < num_layers for i in new):
        raise _Bad("expansion.new_layer_indices", f"must be distinct layer numbers in 0..{num_layers - 1}, in order")
    if len(new) != num_layers - x["original_num_layers"]:
        raise _Bad("expansion.new_layer_indices", f"{len(new)} new layers, but {num_layers} layers grown from "
                                                  f"{x['original_num_layers']}")
    origins = x["layer_origins"]
    if len(origins) != num_layers or any(not 0 <= o < x["original_num_layers"] for o in origins):
        raise _Bad("expansion.layer_origins", f"must name an original layer (0..{x['original_num_layers'] - 1}) "
                                              f"for each of the {num_layers} layers")
    for k, v in x["source_of_new"].items():
        if not (k.isdigit() and 0 <= int(k) < num_layers and 0 <= v < num_layers):
            raise _Bad(f"expansion.source_of_new.{k}", f"must map a layer to a layer (0..{num_layers - 1})")


def _check_layout(layout: dict) -> None:
    unknown = sorted(set(layout) - {"tp", "pp", "vpp", "ep", "etp", "dp", "cp"})
    if unknown:
        raise _Bad("layout", f"unknown field(s) {', '.join(unknown)}")
    for k, v in layout.items():
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise _Bad(f"layout.{k}", f"must be a positive integer (or null), got {v!r:.60}")


def _check_trainable_only(t: dict | None) -> None:
    if t is None:
        return
    _object(t, "trainable_only", {"base": str, "fingerprint": str, "keys": list[str]})
    if not t["fingerprint"].startswith("sha256:"):
        raise _Bad("trainable_only.fingerprint", f"{t['fingerprint'][:40]!r} is not a sha256: fingerprint")


def check_meta(d: Any, source: str, meta_cls: type) -> None:
    """Raise a UserError naming `source` and the first field of the parsed `llamapro.json` that is wrong;
    `meta_cls`: the dataclass it describes (`checkpoint.mcore.CheckpointMeta`)."""
    try:
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise _Bad("format", f"expected {FORMAT!r} (not a llamapro-megatron checkpoint's metadata)")
        _fields(d, meta_cls, "", ignore=("format",))  # arch: LlamaArch's fields, rope_scaling: RopeScaling's
        _check_arch(d["arch"])
        if d["padded_vocab_size"] < d["arch"]["vocab_size"]:
            raise _Bad("padded_vocab_size", f"{d['padded_vocab_size']} is smaller than arch.vocab_size="
                                            f"{d['arch']['vocab_size']}")
        if d["dtype"] not in DTYPES.values():
            raise _Bad("dtype", f"{d['dtype']!r} is not one of {sorted(set(DTYPES.values()))}")
        if d.get("iteration", 0) < 0:
            raise _Bad("iteration", f"must not be negative, got {d['iteration']}")
        _check_layout(d["layout"])
        _check_layers(d)
        _check_trainable_only(d.get("trainable_only"))
    except _Bad as e:
        raise UserError(f"{source} is not valid llamapro-megatron metadata: {e}. The checkpoint is damaged or was "
                        "not written by llamapro-megatron") from None
