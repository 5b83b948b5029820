"""Tests that start processes: ranks over gloo on CPU, spawned conversion workers, torchrun, CLI and tool
subprocesses. Tiny models, OMP_NUM_THREADS=1."""
