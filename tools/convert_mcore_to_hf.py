#!/usr/bin/env python
"""Megatron-style entry point: same as `llamapro convert mcore-to-hf` (run with torchrun to use its ranks)."""
import sys

from llamapro_megatron.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", "mcore-to-hf", *sys.argv[1:]]))
