"""The study's table: changes, seed spreads and which differences it calls significant, on hand-made figures."""
from __future__ import annotations

import math

import pytest

from llamapro_megatron.errors import UserError
from llamapro_megatron.study import Settings, build_graph, expansion_plan, freeze_args, validate
from llamapro_megatron.study_report import change_percent, compare, format_table, tradeoff


def _summary(after: dict[str, list[float]], seeds: int) -> dict:
    """Base perplexity 10 on both domains; `after`: strategy -> per-seed perplexity on code (general = code + 1)."""
    base = {"code": {"tokens": 100, "loss": math.log(10)}, "general": {"tokens": 100, "loss": math.log(10)}}
    rows = {s: [{"seed": i + 1, "trainable": 10, "total": 100, "train_seconds": 1.0, "losses": {"1": 2.0},
                 "eval": {"code": {"tokens": 100, "loss": math.log(p)},
                          "general": {"tokens": 100, "loss": math.log(p + 1)}}} for i, p in enumerate(ppls)]
            for s, ppls in after.items()}
    return {"model": "/m/tiny", "num_layers": 4, "groups": 1, "seeds": seeds, "steps": 1, "global_batch_size": 1,
            "seq_length": 8, "tokens_trained": 8, "lr": 1e-4, "in_domain": ["code"], "retained": ["general"],
            "heldout_domains": ["code", "general"], "base": base, "strategies": rows, "stages": {},
            "seconds_this_run": 0.0}


def test_change_is_the_perplexity_ratio_in_percent():
    assert change_percent(math.log(9), math.log(10)) == pytest.approx(-10.0)
    assert change_percent(1.0, 1.0) == 0.0


def test_differences_within_the_larger_spread_are_not_significant():
    # code changes: a -20 +- (spread 2), b -19 (spread 1): within 2 -> "~"; c -10 (spread 1): outside -> no mark
    s = _summary({"a": [7.9, 8.1], "b": [8.05, 8.15], "c": [8.95, 9.05]}, seeds=2)
    code = compare(s)["code"]
    assert code["a"]["mark"] == "*"
    assert code["a"]["change"] == pytest.approx(-20.0)
    assert code["a"]["spread"] == pytest.approx(2.0)
    assert code["b"]["mark"] == "~" and code["c"]["mark"] == ""
    table = format_table(s)
    assert "[2.0]*" in table and "~ within the seed spread" in table
    t = tradeoff(s)
    assert t["a"]["gain"] == pytest.approx(20.0) and t["a"]["gain_spread"] == pytest.approx(2.0)
    assert t["a"]["retained"] == pytest.approx(-10.0)


def test_one_seed_marks_only_the_best_and_says_noise_is_unmeasured():
    s = _summary({"a": [8.0], "b": [8.01]}, seeds=1)
    code = compare(s)["code"]
    assert (code["a"]["mark"], code["b"]["mark"], code["b"]["spread"]) == ("*", "", None)
    assert "run --seeds 2 or more" in format_table(s)


def test_graph_and_refusals():
    g = build_graph(Settings(workdir="w", strategies=("llamapro", "full"), seeds=2))
    assert list(g) == ["fetch", "data", "convert", "eval:base", "expand:llamapro", "train:llamapro:1",
                       "eval:llamapro:1", "train:llamapro:2", "eval:llamapro:2", "train:full:1", "eval:full:1",
                       "train:full:2", "eval:full:2"]
    assert g["train:full:1"][1] == ("convert", "data") and g["train:llamapro:2"][1] == ("expand:llamapro", "data")
    at = Settings(workdir="w", strategies=("llamapro-at",), positions=(3, 7), seeds=1)
    assert build_graph(at)["expand:llamapro-at"][0] == {"plan": {"positions": [3, 7]}}
    plan = expansion_plan(at, "llamapro-at", 30)
    assert [i for i in range(plan.num_layers) if plan.is_new(i)] == [3, 7]
    assert freeze_args(at, "top-k", 30) == ["--freeze", "layers", "--trainable-layers", "24", "25", "26", "27",
                                            "28", "29"]  # K = --groups 6: the top six
    for kw, message in [({"strategies": ("lora2",)}, "unknown"), ({"strategies": ("full", "full")}, "twice"),
                        ({"strategies": ("llamapro-at",)}, "--positions goes with"), ({"seeds": 0}, "--seeds 0"),
                        ({"train": {"code": "/nonexistent.jsonl"}}, "no such file")]:
        with pytest.raises(UserError, match=message):
            validate(Settings(workdir="w", **kw))
