"""A real two-node SLURM cluster on this machine (tests/slurm_cluster.py): a batch job's srun steps run one task per
node, squeue shows the job while it runs, sacct (--completion) shows it COMPLETED after, and nothing is left
running. Twice, so that a second cluster in the same session proves ports and state do not leak."""
from __future__ import annotations

import pytest
import torch

from tests.slurm_cluster import slurm_cluster

JOB = """#!/usr/bin/env bash
#SBATCH --job-name=smoke
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --output=smoke-%j.out
set -euo pipefail
srun bash -c 'echo task $SLURM_PROCID $SLURM_NODEID $SLURM_NTASKS $SLURMD_NODENAME'
sleep 1  # long enough for squeue to see it RUNNING
"""


@pytest.mark.slow
@pytest.mark.parametrize("round_", [1, 2])
def test_two_node_batch_job(tmp_path, round_):
    with slurm_cluster(tmp_path, nodes=2) as cluster:
        (tmp_path / "job.sh").write_text(JOB)
        job = cluster.sbatch("job.sh", cwd=tmp_path)
        seen = cluster.wait_job(job, timeout=30)
        assert "RUNNING" in seen, seen
        output = (tmp_path / f"smoke-{job}.out").read_text()
        tasks = sorted(line.split()[1:] for line in output.splitlines() if line.startswith("task "))
        assert tasks == [["0", "0", "2", "node1"], ["1", "1", "2", "node2"]], output
        assert [row[1:] for row in cluster.sacct(job)] == [["smoke", "COMPLETED", "0:0", "2"]]
    assert cluster.processes() == []


@pytest.fixture(scope="module")
def gpu_cluster(tmp_path_factory):
    """Two nodes shaped like examples/launch/slurm.sbatch's header asks (32 CPUs, 8 GPUs each: allocation only), so
    the script is submitted exactly as a user would, its header untouched."""
    with slurm_cluster(tmp_path_factory.mktemp("gpu-cluster"), nodes=2, cpus_per_node=32, gpus_per_node=8) as cluster:
        yield cluster
    assert cluster.processes() == []


def _sbatch_slurm_script(cluster, tmp_path, job_env: dict[str, str], *steps: str,
                         timeout: float = 600) -> tuple[list[str], str]:
    """sbatch examples/launch/slurm.sbatch STEPS from the repository root, its output under tmp_path; once the job
    has completed (sacct: COMPLETED 0:0 on 2 nodes), the states squeue showed and the job's output."""
    from tests import cluster_workflow as cw

    job = cluster.sbatch(f"--output={tmp_path}/%x-%j.out", str(cw.LAUNCH / "slurm.sbatch"), *steps, cwd=cw.ROOT,
                         env=job_env)
    seen = cluster.wait_job(job, timeout=timeout)
    log = (tmp_path / f"llamapro-{job}.out").read_text()
    assert [row[1:] for row in cluster.sacct(job)] == [["llamapro", "COMPLETED", "0:0", "2"]], log[-6000:]
    return seen, log


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "srun"])
def test_slurm_sbatch_runs_the_workflow_on_two_nodes(launch_inputs, one_node_workflow, gpu_cluster, tmp_path,
                                                     launcher):
    """sbatch examples/launch/slurm.sbatch: convert, expand, plan, train (PP2: one stage per node) and export in one
    two-node job, ranks started by torchrun inside the allocation or by srun itself; squeue shows it running, sacct
    completed, its output names the checkpoint, and every tensor equals the single-node run's."""
    from tests import cluster_workflow as cw

    env, _ = launch_inputs
    work = tmp_path / "work"
    # one GPU's worth of ranks per node; node names do not resolve here: the first node is 127.0.0.1
    job_env = {**env, "WORK": str(work), "LAUNCHER": launcher, "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(cw.free_port())}
    seen, log = _sbatch_slurm_script(gpu_cluster, tmp_path, job_env, "convert", "expand", "plan", "train", "export")
    assert "RUNNING" in seen, (seen, log[-3000:])
    trained = work / "ckpt" / "pro-trained" / "iter_0000004"
    assert f"trained checkpoint:   {trained} (the latest" in log, log[-3000:]
    assert f"Hugging Face model:   {work / 'pro-hf'}" in log
    assert "stage 1: trainable" in log and "x DP 1)" in log, log[-3000:]  # 2 ranks: one pipeline stage each
    cw.assert_same_tensors(trained, one_node_workflow / "ckpt" / "pro-trained" / "iter_0000004", tmp_path)
    cw.assert_same_export(work / "pro-hf", one_node_workflow / "pro-hf")


@pytest.mark.slow
def test_slurm_sbatch_srun_starts_every_rank_two_per_node(launch_inputs, one_node_workflow, gpu_cluster, tmp_path):
    """LAUNCHER=srun with GPUS_PER_NODE=2: srun starts 4 ranks (2 per node, whatever task count the job's header
    has) that rendezvous and convert the model at PP2 as the single-node run did, tensor for tensor."""
    from tests import cluster_workflow as cw

    env, _ = launch_inputs
    work = tmp_path / "work"
    job_env = {**env, "WORK": str(work), "LAUNCHER": "srun", "GPUS_PER_NODE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(cw.free_port())}
    _, log = _sbatch_slurm_script(gpu_cluster, tmp_path, job_env, "convert", timeout=300)
    assert "+ srun --nodes 2 --ntasks 4 --ntasks-per-node 2 --cpus-per-task 16 " in log, log[-3000:]
    ours = cw.checkpoint_tensors(work / "ckpt" / "base" / "release", tmp_path)
    reference = cw.checkpoint_tensors(one_node_workflow / "ckpt" / "base" / "release", tmp_path)
    assert set(ours) == set(reference) and len(ours) >= 9  # per-layer tensors stacked
    assert all(torch.equal(ours[k], reference[k]) for k in ours)
