"""examples/launch/: each script is valid bash, and every command it runs (printed by DRY_RUN=1) parses with the real
parsers: torchrun's own (torch.distributed.run) and llamapro's; the training commands load into a valid trainer
configuration whose layout fits the launched world, and the steps cover the whole workflow."""
from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

from llamapro_megatron.cli import build_parser
from llamapro_megatron.training.config import config_from_args

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = ROOT / "examples" / "launch"
CLUSTER = {"NNODES": "2", "NODE_RANK": "0", "MASTER_ADDR": "node0", "MASTER_PORT": "29500", "SLURM_NNODES": "2",
           "SLURM_JOB_ID": "42"}
# case -> (script, arguments, world size it launches, more settings)
SCRIPTS = {"single_node.sh": ("single_node.sh", [], 8, {}),
           "multi_node.sh": ("multi_node.sh", ["preprocess", "convert", "expand", "plan", "train", "export"], 16, {}),
           "multi_node.sh static": ("multi_node.sh", ["preprocess", "convert", "expand", "plan", "train", "export"],
                                    16, {"RDZV": "static"}),
           "slurm.sbatch": ("slurm.sbatch", [], 16, {}),
           "slurm.sbatch srun": ("slurm.sbatch", [], 16, {"LAUNCHER": "srun", "SLURM_CPUS_PER_TASK": "32"})}
WORKFLOW = ["convert hf-to-mcore", "expand", "preprocess", "preprocess", "train --dry-run", "train",
            "convert mcore-to-hf"]


def _commands(script: str, argv: list[str], settings: dict[str, str] | None = None) -> list[list[str]]:
    env = {**os.environ, **CLUSTER, "DRY_RUN": "1", **(settings or {})}
    proc = subprocess.run(["bash", str(LAUNCH / script), *argv], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [shlex.split(line[2:]) for line in proc.stdout.splitlines() if line.startswith("+ ")]


def test_every_script_is_valid_bash():
    scripts = sorted(LAUNCH.iterdir())
    assert {p.name for p in scripts} >= {"common.sh", *(case[0] for case in SCRIPTS.values())}
    for path in scripts:
        proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert proc.returncode == 0, (path.name, proc.stderr)
        assert path.read_text().splitlines()[1].startswith("#"), f"{path.name}: no documentation at its top"


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_command_parses_with_the_real_parsers(script):
    from torch.distributed.run import get_args_parser, parse_min_max_nnodes

    name, argv, world, settings = SCRIPTS[script]
    parser = build_parser()
    steps, layouts = [], {}
    for cmd in _commands(name, argv, settings):
        if "torchrun" in cmd:  # srun ... torchrun ...: torchrun's parser, then llamapro's on what it runs
            run = get_args_parser().parse_args(cmd[cmd.index("torchrun") + 1:])
            if cmd[0] == "srun":  # one torchrun per node, whatever task count the job was submitted with
                assert cmd[cmd.index("--ntasks") + 1] == cmd[cmd.index("--nodes") + 1] == run.nnodes, cmd
            assert run.module and run.training_script == "llamapro_megatron.cli", cmd
            nnodes = parse_min_max_nnodes(run.nnodes)[1]
            assert nnodes * int(run.nproc_per_node) == world, cmd
            assert nnodes == 1 or run.rdzv_endpoint or run.master_addr, cmd
            assert nnodes == 1 or ("--rdzv-backend" in cmd) == (settings.get("RDZV", "c10d") == "c10d"), cmd
            llamapro = run.training_script_args
        elif "llamapro_megatron.cli" in cmd:  # srun starts every rank: tasks per node x nodes is the world
            assert cmd[0] == "srun", cmd
            tasks = int(cmd[cmd.index("--ntasks-per-node") + 1]) * int(cmd[cmd.index("--nodes") + 1])
            assert tasks == world == int(cmd[cmd.index("--ntasks") + 1]), cmd
            assert int(cmd[cmd.index("--cpus-per-task") + 1]) == 32 // 8, cmd
            wrapper = cmd[cmd.index("-c") + 1]
            assert all(f"{k}=$SLURM_" in wrapper for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")), wrapper
            llamapro = cmd[cmd.index("llamapro_megatron.cli") + 1:]
        else:
            llamapro = cmd[cmd.index("llamapro") + 1:]
        args = parser.parse_args(llamapro)
        sub = args.command + (f" {args.direction}" if hasattr(args, "direction") else "")
        steps.append(sub + (" --dry-run" if getattr(args, "dry_run", False) else ""))
        if args.command in ("convert", "expand") and hasattr(args, "tp"):
            layouts[args.command] = (args.tp, args.pp)
        if args.command == "train":
            config = config_from_args(args)  # the trainer's own validation of recipe + flags
            p = config.parallelism
            tp_pp = (p.tensor_model_parallel_size, p.pipeline_model_parallel_size)
            assert world % (tp_pp[0] * tp_pp[1]) == 0, cmd
            assert tp_pp == layouts.get("convert") == layouts.get("expand"), cmd
            if args.dry_run:
                assert args.world_size == world, cmd
    assert sorted(steps) == sorted(WORKFLOW), steps
