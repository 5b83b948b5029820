"""`dcp.archive` frames tensor bytes exactly as `torch.save` does (CRC-32 off), and `torch.load` reads them."""
from __future__ import annotations

import io

import pytest
import torch

from llamapro_megatron.checkpoint.dcp import archive

ID_RECORD = b"archive/.data/serialization_idFB"


def _without_serialization_id(raw: bytes) -> bytes:
    at = raw.rindex(ID_RECORD) + len(ID_RECORD)
    start = at + 2 + int.from_bytes(raw[at:at + 2], "little")  # past the alignment padding
    return raw[:start] + b"#" * 40 + raw[start + 40:]


@pytest.mark.parametrize("dtype,shape", [
    ("bfloat16", (1, 3, 4)), ("bfloat16", (1, 96, 64)), ("float32", (70000, 2)), ("float16", (3,)),
    ("float64", (2, 3, 4, 5)), ("float32", ()), ("bfloat16", (300, 1)),
])
def test_archive_is_torch_save_byte_for_byte(dtype, shape):
    tensor = (torch.randn(*shape) if shape else torch.tensor(1.5)).to(getattr(torch, dtype))
    buf = io.BytesIO()
    crc = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        torch.save(tensor, buf)
    finally:
        torch.serialization.set_crc32_options(crc)
    frame = archive.frame(dtype, shape, serialization_id=7)
    ours = frame.prefix + tensor.reshape(-1).view(torch.uint8).numpy().tobytes() + frame.suffix
    assert frame.size == len(ours) == len(buf.getvalue())
    assert _without_serialization_id(ours) == _without_serialization_id(buf.getvalue())
    back = torch.load(io.BytesIO(ours), weights_only=True)
    assert back.dtype == tensor.dtype and back.shape == tensor.shape and torch.equal(back, tensor)


def test_unsupported_archives_are_refused():
    assert not archive.supported("int8", 4)
    assert not archive.supported("bfloat16", 0)
    assert not archive.supported("float32", archive.MAX_DATA_BYTES + 4)
    with pytest.raises(ValueError):
        archive.frame("float32", (0, 4))
