"""The CLI's surface: subcommands and their arguments (the tools/ scripts: tests/distributed/test_processes.py)."""
from __future__ import annotations

import pytest

from llamapro_megatron.cli import build_parser


@pytest.mark.parametrize("argv", [["convert", "hf-to-mcore"], ["convert", "mcore-to-hf"], ["verify"], ["preprocess"],
                                  ["expand"], ["expand-hf"], ["train"]])
def test_subcommands_have_help(argv, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([*argv, "--help"])
    assert e.value.code == 0
    assert "usage: llamapro " + " ".join(argv) in capsys.readouterr().out


def test_evaluate_data_sets_add_up_whether_listed_or_repeated():
    listed = build_parser().parse_args(["evaluate", "--load", "c", "--data", "code=a", "math=b"])
    repeated = build_parser().parse_args(["evaluate", "--load", "c", "--data", "code=a", "--data", "math=b"])
    assert listed.data == repeated.data == ["code=a", "math=b"]


@pytest.mark.parametrize("models", [{}, {"load": "c", "hf_dir": "h"}], ids=["neither", "both"])
def test_evaluate_and_generate_need_exactly_one_model(models):
    """The Python API checks what the CLI's argparse group enforces, before loading anything."""
    from llamapro_megatron.errors import UserError
    from llamapro_megatron.evaluate import evaluate
    from llamapro_megatron.generate import generate

    for call in (lambda: generate(["x"], **models), lambda: evaluate({"code": "a"}, **models)):
        with pytest.raises(UserError, match="give exactly one of --load .Megatron checkpoint. and --hf-dir"):
            call()
