#!/usr/bin/env python
"""Megatron-style entry point: same as `llamapro convert hf-to-mcore` (run with torchrun to use its ranks)."""
import sys

from llamapro_megatron.cli import main

if __name__ == "__main__":  # guard: dist_checkpointing's async writer starts processes
    sys.exit(main(["convert", "hf-to-mcore", *sys.argv[1:]]))
