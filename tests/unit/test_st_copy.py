"""st_copy writes the bytes safetensors.torch.save_file writes for the same (renamed, zeroed) tensors."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from llamapro_megatron.checkpoint.st_copy import TensorCopy, write_shard


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_byte_identical_to_save_file(tmp_path, dtype):
    g = torch.Generator().manual_seed(0)
    a = {"layers.0.w": torch.randn(7, 5, generator=g).to(dtype), "layers.0.norm": torch.randn(5, generator=g).to(dtype)}
    b = {"embed": torch.randn(11, 5, generator=g).to(dtype), "scalar": torch.tensor(3.0, dtype=dtype)}
    save_file(a, str(tmp_path / "a.safetensors"), metadata={"format": "pt"})
    save_file(b, str(tmp_path / "b.safetensors"), metadata={"format": "pt"})
    fa, fb = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    plan = [TensorCopy("z.copy.w", fa, "layers.0.w", zero=True), TensorCopy("layers.1.norm", fa, "layers.0.norm"),
            TensorCopy("embed", fb, "embed"), TensorCopy("layers.1.w", fa, "layers.0.w"), TensorCopy("s", fb, "scalar")]
    n = write_shard(tmp_path / "out.safetensors", plan, {"format": "pt"})

    expected = {"z.copy.w": torch.zeros(7, 5, dtype=dtype), "layers.1.norm": a["layers.0.norm"], "embed": b["embed"],
                "layers.1.w": a["layers.0.w"], "s": b["scalar"]}
    save_file(expected, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    assert (tmp_path / "out.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    assert n == sum(t.numel() * t.element_size() for t in expected.values())
    assert (tmp_path / "out.safetensors").stat().st_mode == (tmp_path / "ref.safetensors").stat().st_mode


def test_mixed_dtypes_refused(tmp_path):
    save_file({"x": torch.ones(2), "y": torch.ones(2, dtype=torch.bfloat16)}, str(tmp_path / "a.safetensors"))
    f = str(tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="one dtype per shard"):
        write_shard(tmp_path / "out.safetensors", [TensorCopy("x", f, "x"), TensorCopy("y", f, "y")])
