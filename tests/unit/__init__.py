"""Single-process tests: no worker, rank or subprocess is started (those are in tests/distributed)."""
