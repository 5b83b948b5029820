"""Checkpoints: Hugging Face <-> Megatron conversion, block expansion, merge, and the reader and writer of Megatron
torch_dist checkpoints. One fact, one place:

- `mapping`   the tensor description (every stored megatron tensor as HF row spans); every path consumes it
- `units`     the work plan (units, sizes, owners, rounds); `output`: `OUT.partial`, commit, failure messages
- `convert`   the conversion entry points and the choice of path: `direct_import` / `direct_export` (bytes copied
              file to file, gated by megatron-core and torch) or `regular_import` / `regular_export` (workers)
- `save`, `load`  the writer (rounds) and the one reader (full and trainable-only checkpoints; `trainable`)
- `expand`, `expand_hf`, `merge`  block expansion (Megatron and HF) and trainable-only merges
- `mcore`, `hf`, `st_copy`  Megatron directories and `llamapro.json`; HF directories; safetensors byte copies
- `dcp/`      the private file formats (torch.save archives, DCP metadata), with what they rely on
- `gguf_import`  a GGUF model as a HF directory (the offline SmolLM2); `cli` the commands
"""
