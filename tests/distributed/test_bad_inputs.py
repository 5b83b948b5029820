"""Bad input to every command, as a careless user gives it: one short `error:` message naming the file or flag,
the documented exit code (2: bad input; 1: a refused hostile file, tests/distributed/test_safe_loading.py), no
traceback, and no output left that looks like a result.

Each case damages a copy of the shared workflow checkpoints (tests/distributed/conftest.py) and runs `llamapro` in a
fresh process, as a user would.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.distributed.versions import TRAIN


def _run(*argv: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "LLAMAPRO_DEBUG"}
    return subprocess.run([sys.executable, "-m", "llamapro_megatron.cli", *argv], capture_output=True, text=True,
                          env=dict(env, OMP_NUM_THREADS="1"), timeout=600)


class Case:
    """`prepare(clean, tmp)` damages copies and returns the command line; the run must fail with `code` and say
    `says`; `out` (under tmp) must not exist afterwards, nor its `.partial`."""

    def __init__(self, prepare: Callable[[Path, Path], list[str]], says: str, code: int = 2, out: str = "out"):
        self.prepare, self.says, self.code, self.out = prepare, says, code, out


def _copy(clean: Path, tmp: Path, name: str) -> Path:
    shutil.copytree(clean / name, tmp / name)
    return tmp / name


def _distcp(ckpt: Path) -> Path:
    return sorted(ckpt.glob("*.distcp"))[0]


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _edit_meta(path: Path, **changes) -> None:
    meta = json.loads(path.read_text())
    for k, v in changes.items():
        cursor, *rest = k.split("__")
        if rest:
            meta[cursor][rest[0]] = v
        else:
            meta[k] = v
    path.write_text(json.dumps(meta))


def _hf(clean, tmp, damage=None):
    d = _copy(clean, tmp, "hf")
    if damage:
        damage(d)
    return d


def _to_mcore(clean, tmp, damage=None, *flags):
    return ["convert", "hf-to-mcore", "--hf-dir", str(_hf(clean, tmp, damage)), "--out", str(tmp / "out"),
            "--no-progress", *flags]


def _release(clean, tmp, damage, name="pro"):
    ckpt = _copy(clean, tmp, name)
    damage(ckpt / "release")
    return ckpt


def _to_hf(ckpt: Path, tmp: Path, *flags) -> list[str]:
    return ["convert", "mcore-to-hf", "--load", str(ckpt), "--out", str(tmp / "out"), "--no-progress", *flags]


def _bin_only(d: Path) -> None:
    (d / "model.safetensors").rename(d / "pytorch_model.bin")


def _drop_tensor(d: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(d / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})


def _garbage_header(d: Path) -> None:
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[:8] + b"\x00garbage" + data[16:])


def _full_disk(clean: Path, tmp: Path) -> list[str]:
    mount = tmp / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    return ["convert", "mcore-to-hf", "--load", str(clean / "pro"), "--out", str(mount / "out"), "--no-progress"]


CASES = {
    # convert hf-to-mcore: the Hugging Face input
    "hf-missing-dir": Case(lambda c, t: ["convert", "hf-to-mcore", "--hf-dir", str(t / "nowhere"), "--out",
                                         str(t / "out")], "nowhere"),
    "hf-no-config": Case(lambda c, t: _to_mcore(c, t, lambda d: (d / "config.json").unlink()), "no config.json"),
    "hf-config-not-json": Case(lambda c, t: _to_mcore(c, t, lambda d: (d / "config.json").write_text("{arch")),
                               "config.json is not valid JSON"),
    "hf-bin-only": Case(lambda c, t: _to_mcore(c, t, _bin_only), "safe_serialization=True"),
    "hf-truncated-weights": Case(lambda c, t: _to_mcore(c, t, lambda d: _truncate(d / "model.safetensors", 0.9)),
                                 "truncated"),
    "hf-garbage-header": Case(lambda c, t: _to_mcore(c, t, _garbage_header), "model.safetensors"),
    "hf-missing-tensor": Case(lambda c, t: _to_mcore(c, t, _drop_tensor), "model.layers.1.self_attn.k_proj.weight"),
    "hf-bad-tp": Case(lambda c, t: _to_mcore(c, t, None, "--tp", "3"), "--tp 3"),
    "hf-bad-dtype-flag": Case(lambda c, t: _to_mcore(c, t, None, "--dtype", "fp64"), "--dtype"),
    "hf-bad-groups": Case(lambda c, t: _to_mcore(c, t, None, "--groups", "3"), "--groups"),
    # convert mcore-to-hf and the other readers: the Megatron checkpoint
    "mc-missing-dir": Case(lambda c, t: _to_hf(t / "nowhere", t), "does not exist"),
    "mc-not-a-checkpoint": Case(lambda c, t: _to_hf(_copy(c, t, "hf"), t), "not a Megatron checkpoint directory"),
    "mc-latest-garbage": Case(lambda c, t: _to_hf(_latest(c, t, "../../etc"), t), "latest_checkpointed_iteration"),
    "mc-no-llamapro-json": Case(lambda c, t: _to_hf(_release(c, t, lambda r: (r / "llamapro.json").unlink()), t),
                                "has no llamapro.json"),
    "mc-llamapro-json-damaged": Case(lambda c, t: _to_hf(_release(
        c, t, lambda r: _edit_meta(r / "llamapro.json", arch__num_layers="six")), t), "arch.num_layers"),
    "mc-no-dcp-metadata": Case(lambda c, t: _to_hf(_release(c, t, lambda r: (r / ".metadata").unlink()), t),
                               "has no .metadata"),
    "mc-truncated-dcp-metadata": Case(lambda c, t: _to_hf(_release(c, t, lambda r: _truncate(r / ".metadata")), t),
                                      ".metadata cannot be read"),
    "mc-missing-distcp": Case(lambda c, t: _to_hf(_release(c, t, lambda r: _distcp(r).unlink()), t),
                              ".distcp is missing"),
    "mc-truncated-distcp": Case(lambda c, t: _to_hf(_release(c, t, lambda r: _truncate(_distcp(r))), t),
                                ".distcp is truncated"),
    "mc-full-disk": Case(_full_disk, "No space left on device", out="small/out"),
    "mc-bad-dtype-flag": Case(lambda c, t: _to_hf(c / "pro", t, "--dtype", "int8"), "--dtype"),
    "expand-truncated-distcp": Case(lambda c, t: ["expand", "--load", str(_release(
        c, t, lambda r: _truncate(_distcp(r)))), "--out", str(t / "out"), "--groups", "2", "--no-progress"],
        ".distcp is truncated"),
    "expand-bad-positions": Case(lambda c, t: ["expand", "--load", str(c / "mc"), "--out", str(t / "out"),
                                               "--positions", "0,9", "--no-progress"], "--positions"),
    "expand-bad-pp": Case(lambda c, t: ["expand", "--load", str(c / "mc"), "--out", str(t / "out"), "--groups",
                                        "2", "--pp", "16", "--no-progress"], "--pp 16"),
    "verify-hf-bin-only": Case(lambda c, t: ["verify", "--load", str(c / "mc"), "--hf-dir",
                                             str(_hf(c, t, _bin_only))], "safe_serialization=True", out="none"),
    "verify-damaged-meta": Case(lambda c, t: ["verify", "--load", str(_release(
        c, t, lambda r: _edit_meta(r / "llamapro.json", padded_vocab_size=7), "mc")), "--hf-dir", str(c / "hf")],
        "padded_vocab_size", out="none"),
    "evaluate-missing-data": Case(lambda c, t: ["evaluate", "--load", str(c / "pro"), "--data",
                                                f"code={t / 'none.jsonl'}", "--seq-length", "8"], "none.jsonl",
                                  out="none"),
    "generate-truncated-distcp": Case(lambda c, t: ["generate", "--load", str(_release(
        c, t, lambda r: _truncate(_distcp(r)))), "--prompt", "def", "--max-new-tokens", "2"], ".distcp is truncated",
        out="none"),
    # train
    "train-freeze-never-expanded": Case(lambda c, t: ["train", "--load", str(c / "mc"), "--save", str(t / "out"),
                                                      "--train-iters", "1", "--freeze", "llamapro", *TRAIN],
                                        "has no expansion metadata"),
    "train-missing-data": Case(lambda c, t: ["train", "--load", str(c / "pro"), "--save", str(t / "out"),
                                             "--train-iters", "1", *[a for a in TRAIN if a != "--mock-data"],
                                             "--data-path", str(t / "nothing")], "nothing"),
    "train-bad-tp": Case(lambda c, t: ["train", "--load", str(c / "pro"), "--save", str(t / "out"),
                                       "--train-iters", "1", *TRAIN, "--tensor-model-parallel-size", "3"],
                         "--tensor-model-parallel-size"),
    "train-resume-truncated": Case(lambda c, t: ["train", "--load", str(_iteration(
        c, t, lambda i: _truncate(_distcp(i)))), "--save", str(t / "out"), "--train-iters", "2", *TRAIN],
        ".distcp is truncated"),
    "train-resume-damaged-meta": Case(lambda c, t: ["train", "--load", str(_iteration(
        c, t, lambda i: _edit_meta(i / "llamapro.json", iteration=-4))), "--save", str(t / "out"), "--train-iters",
        "2", *TRAIN], "iteration"),
    "merge-base-moved": Case(lambda c, t: ["merge", "--trainable", str(_copy(c, t, "tro")), "--base",
                                           str(c / "mc"), "--out", str(t / "out"), "--no-progress"],
                             "does not match"),
}


def _latest(clean: Path, tmp: Path, text: str) -> Path:
    ckpt = _copy(clean, tmp, "pro")
    (ckpt / "latest_checkpointed_iteration.txt").write_text(text)
    return ckpt


def _iteration(clean: Path, tmp: Path, damage) -> Path:
    ckpt = _copy(clean, tmp, "tr")
    damage(ckpt / "iter_0000001")
    return ckpt


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gets_one_short_error(workflow_checkpoints, tmp_path, name):
    case = CASES[name]
    argv = case.prepare(workflow_checkpoints, tmp_path)
    try:
        proc = _run(*argv)
    finally:
        if name == "mc-full-disk":
            out_exists = (tmp_path / case.out).exists() or (tmp_path / (case.out + ".partial")).exists()
            subprocess.run(["umount", str(tmp_path / "small")], capture_output=True)
    err = proc.stderr
    assert proc.returncode == case.code, f"exit {proc.returncode}:\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    lines = [x for x in err.splitlines() if x.strip() and "it/s]" not in x and "s/it]" not in x]
    errors = [x for x in lines if "error:" in x]
    assert len(errors) == 1 and case.says in errors[0], err[-3000:]
    # the error is the last line; before it only the argument parser's usage (for a bad flag)
    before = lines[:lines.index(errors[0])]
    assert lines[-1] == errors[0] and (not before or before[0].startswith("usage: ")), err[-3000:]
    if name != "mc-full-disk":
        out_exists = (tmp_path / case.out).exists() or (tmp_path / (case.out + ".partial")).exists()
    assert not out_exists
