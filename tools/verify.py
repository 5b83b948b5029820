#!/usr/bin/env python
"""Megatron-style entry point: same as `llamapro verify`."""
import sys

from llamapro_megatron.cli import main

if __name__ == "__main__":
    sys.exit(main(["verify", *sys.argv[1:]]))
