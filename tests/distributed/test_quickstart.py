"""`llamapro quickstart`, shortened (2 steps of 2 x 64 tokens, 256 held-out tokens per domain), on real SmolLM2.

The figures it prints are checked against independent references: the before/after perplexities equal
transformers' on SmolLM2 and on the exported HF directory; the exported model differs from SmolLM2 in the new
blocks only (every original block, the embeddings and the final norm bit-exact); the parameter count is six
SmolLM2 blocks. A second run skips every finished stage without starting a rank; a stage whose marker is missing
(as after a crash) reruns alone; changed settings rerun exactly the stages that depend on them.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llamapro_megatron.quickstart import DOMAINS, STAGES, Settings, Workdir, quickstart, stages_to_run

REL_TOL = 1e-5  # fp32, the same windows, summed in float64


def _settings(workdir) -> Settings:
    return Settings(workdir=str(workdir), steps=2, seq_length=64, global_batch_size=2, heldout_tokens=256,
                    train_chars=20_000, progress=False)


def _tensors(hf_dir) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("quickstart")
    yield workdir, quickstart(_settings(workdir))
    shutil.rmtree(workdir, ignore_errors=True)  # ~2.5 GB: keep the suite's disk peak low


@pytest.mark.slow
def test_perplexities_are_transformers_on_smollm2_and_on_the_export(run):
    from llamapro_megatron.evaluate import evaluate

    workdir, summary = run
    wd = Workdir(workdir)
    data = {d: str(wd.data / f"heldout_{d}.jsonl") for d in DOMAINS}
    for which, hf_dir in (("before", wd.read("fetch")["result"]["hf_dir"]), ("after", summary["hf_export"])):
        reference = evaluate(data, hf_dir=hf_dir, seq_length=64, max_tokens=256, progress=False)
        for r in reference:
            got = summary[which][r.domain]
            assert got["tokens"] == r.tokens == 256, (which, r.domain)
            assert got["loss"] == pytest.approx(r.loss, rel=REL_TOL), (which, r.domain)
    assert summary["tokens_trained"] == 2 * 2 * 64
    assert set(summary["train_losses"]) == {"1", "2"}


@pytest.mark.slow
def test_only_the_new_blocks_changed(run):
    workdir, summary = run
    wd = Workdir(workdir)
    base = _tensors(Path(wd.read("fetch")["result"]["hf_dir"]))
    pro = _tensors(wd.path("hf_pro"))
    new = [5, 11, 17, 23, 29, 35]  # one copy after each group of 5 of the 30 blocks
    source = [i - sum(n <= i for n in new) for i in range(36)]  # an old block's index in SmolLM2
    per_block = 0
    for name, tensor in pro.items():
        if not name.startswith("model.layers."):
            assert torch.equal(tensor, base[name]), name
            continue
        layer, rest = int(name.split(".")[2]), ".".join(name.split(".")[3:])
        if layer in new:  # trained from its identity init: a copy of the block before it, output projections 0
            per_block += tensor.numel() if layer == new[0] else 0
            init = base[f"model.layers.{source[layer - 1]}.{rest}"]
            if rest.endswith(("o_proj.weight", "down_proj.weight")):
                init = torch.zeros_like(init)
            assert not torch.equal(tensor, init), name
        else:
            assert torch.equal(tensor, base[f"model.layers.{source[layer]}.{rest}"]), name
    assert summary["parameters"]["trained"] == 6 * per_block
    assert summary["parameters"]["total"] == sum(t.numel() for t in base.values()) + 6 * per_block


@pytest.mark.slow
def test_second_run_skips_finished_stages_and_a_missing_marker_reruns_alone(run):
    workdir, first = run
    wd = Workdir(workdir)
    stamps = {s: wd.read(s)["finished"] for s in STAGES}
    t0 = time.time()
    again = quickstart(_settings(workdir))
    assert time.time() - t0 < 10  # no rank started
    assert all(v["cached"] for v in again["stages"].values())
    assert {s: wd.read(s)["finished"] for s in STAGES} == stamps
    assert again["after"] == first["after"]

    exported = _tensors(wd.path("hf_pro"))
    wd.marker("export").unlink()  # as if the run died while exporting
    resumed = quickstart(_settings(workdir))
    assert [s for s, v in resumed["stages"].items() if not v["cached"]] == ["export"]
    assert resumed["parameters"] == first["parameters"]
    again = _tensors(wd.path("hf_pro"))
    assert again.keys() == exported.keys() and all(torch.equal(again[k], exported[k]) for k in exported)


@pytest.mark.slow
def test_changed_settings_rerun_what_depends_on_them(run, tmp_path):
    workdir, _ = run
    for change, expected in [({}, []),
                             ({"heldout_tokens": 128}, ["eval_before", "eval_after"]),
                             ({"steps": 3}, ["train", "export", "eval_after"]),
                             ({"groups": 5}, ["expand", "train", "export", "eval_after"]),
                             ({"train_chars": 1000}, ["data", "eval_before", "train", "export", "eval_after"])]:
        copy = tmp_path / json.dumps(change).strip("{}").replace('"', "").replace(": ", "=") / "stages"
        shutil.copytree(workdir / "stages", copy)  # stages_to_run drops stale markers: work on a copy
        settings = _settings(copy.parent)
        for k, v in change.items():
            setattr(settings, k, v)
        assert stages_to_run(settings, Workdir(copy.parent)) == expected, change


@pytest.mark.slow
def test_generate_from_the_trained_checkpoint_equals_transformers_on_the_export(run):
    """`llamapro generate` on real trained weights (36 blocks, tied embeddings split over PP=2)."""
    from llamapro_megatron.generate import generate

    workdir, summary = run
    prompts = ["def fibonacci(n):", "Problem: What is 7 times 8?\n\nSolution:"]
    megatron = generate(prompts, load=workdir / "trained", pp=2, max_new_tokens=8)
    transformers = generate(prompts, hf_dir=summary["hf_export"], max_new_tokens=8)
    assert megatron == transformers
    assert all(len(new) == 8 for _, new in megatron)
