"""The bytes of `torch.save(tensor)` for one contiguous CPU tensor, made without torch.

PyTorch's DCP writer (under megatron-core's torch_dist format) stores every tensor chunk of a checkpoint as a
`torch.save` archive inside a `.distcp` file, and its reader `torch.load`s each one back. So a process that does
not import torch (seconds per process on a small machine) can still write checkpoint data, moving the bytes from
file to file in the kernel (`st_copy`), if it frames them as torch.save does. That frame is small and fixed:

    zip archive, every record stored (no compression), its data 64-byte aligned:
      archive/data.pkl                 pickle (protocol 2): torch._utils._rebuild_tensor_v2(storage, 0, size,
                                       stride, False, OrderedDict()), the storage a persistent id
                                       ('storage', torch.<Type>Storage, '0', 'cpu', numel)
      archive/.format_version          "1"
      archive/.storage_alignment       "64"
      archive/byteorder                "little"
      archive/data/0                   the tensor's bytes
      archive/version                  "3\\n"
      archive/.data/serialization_id   40 digits
    then the central directory, a zip64 end record and locator, and the end record.

This is `torch.save`'s output byte for byte with CRC-32 off (`torch.serialization.set_crc32_options(False)`; its
reader never checks them), serialization id aside: `tests/unit/test_dcp_archive.py` compares the two. Archives
of 2 GiB and more would need zip64 fields per record; `frame` refuses them (callers fall back to torch.save).

Relies on (torch 2.4 - 2.13): DCP's file system reader `torch.load`s each chunk from exactly its recorded byte
range (`filesystem.py`, `_StorageInfo.offset/length`), with `weights_only=True`; torch.load reads a zip archive
whose records are stored, finds them by name through the central directory and ignores their CRC fields and the
serialization id's value. The direct import reads one archive it wrote back with `torch.load(weights_only=True)`
before it commits, so another torch that disagrees falls back instead of writing a checkpoint it cannot read.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass

ALIGNMENT = 64
MAX_DATA_BYTES = (1 << 31) - (1 << 20)  # keeps every offset and size in 32 bits with room for the frame
STORAGE_TYPES = {"bfloat16": "BFloat16Storage", "float16": "HalfStorage", "float32": "FloatStorage",
                  "float64": "DoubleStorage"}
ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4, "float64": 8}
_ARCHIVE = "archive/"


def supported(dtype: str, nbytes: int) -> bool:
    """Whether `frame` can make the archive (torch.save lays out empty tensors differently: not needed here)."""
    return dtype in STORAGE_TYPES and 0 < nbytes <= MAX_DATA_BYTES


@dataclass(frozen=True)
class Frame:
    """An archive is `prefix`, the tensor's `data_bytes`, then `suffix`."""
    prefix: bytes
    suffix: bytes
    data_bytes: int

    @property
    def size(self) -> int:
        return len(self.prefix) + self.data_bytes + len(self.suffix)


def frame(dtype: str, shape: tuple[int, ...], serialization_id: int = 0) -> Frame:
    """The bytes around a contiguous tensor of `dtype` and `shape` (row-major) in its torch.save archive."""
    numel = math.prod(shape)
    nbytes = numel * ITEMSIZE[dtype]
    if not supported(dtype, nbytes):
        raise ValueError(f"no torch-free archive for {dtype} {list(shape)}")
    stride = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
    records = [
        ("data.pkl", _tensor_pickle(STORAGE_TYPES[dtype], numel, shape, stride)),
        (".format_version", b"1"),
        (".storage_alignment", str(ALIGNMENT).encode()),
        ("byteorder", b"little"),
        ("data/0", None),  # the tensor: written by the caller between prefix and suffix
        ("version", b"3\n"),
        (".data/serialization_id", f"{serialization_id:040d}".encode()),
    ]
    parts: list[bytes] = []
    central: list[bytes] = []
    offset = 0
    prefix = b""
    for name, data in records:
        full = (_ARCHIVE + name).encode()
        size = nbytes if data is None else len(data)
        header = _local_header(full, offset)
        central.append(struct.pack("<4s6H3I5H2I", b"PK\x01\x02", 0, 0, 0x0808, 0, 0, 0, 0, size, size, len(full),
                                   0, 0, 0, 0, 0, offset) + full)
        descriptor = struct.pack("<4s3I", b"PK\x07\x08", 0, size, size)
        if data is None:
            prefix = b"".join(parts) + header
            parts = [descriptor]
        else:
            parts.append(header + data + descriptor)
        offset += len(header) + size + len(descriptor)
    cd = b"".join(central)
    n = len(records)
    zip64_end = struct.pack("<4sQ2H2I4Q", b"PK\x06\x06", 44, 0x031E, 0x2D, 0, 0, n, n, len(cd), offset)
    locator = struct.pack("<4sIQI", b"PK\x06\x07", 0, offset + len(cd), 1)
    end = struct.pack("<4s4H2IH", b"PK\x05\x06", 0, 0, n, n, len(cd), offset, 0)
    return Frame(prefix, b"".join(parts) + cd + zip64_end + locator + end, nbytes)


def _local_header(name: bytes, offset: int) -> bytes:
    """A stored record's local header, its extra field padding the data to the archive's alignment (as miniz's
    writer in PyTorch pads it: an 'FB' field of 'Z's)."""
    pad = -(offset + 30 + len(name) + 4) % ALIGNMENT
    extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
    return struct.pack("<4s5H3I2H", b"PK\x03\x04", 0, 0x0808, 0, 0, 0, 0, 0, 0, len(name), len(extra)) + name + extra


# -------------------------------------------------------------- pickle (protocol 2, as the pickle module writes it)
def _tensor_pickle(storage_type: str, numel: int, shape: tuple[int, ...], stride: tuple[int, ...]) -> bytes:
    memo = iter(range(256))

    def put() -> bytes:
        return b"q" + bytes([next(memo)])

    def text(s: str) -> bytes:
        raw = s.encode()
        return b"X" + struct.pack("<I", len(raw)) + raw + put()

    def tup(values: tuple[int, ...]) -> bytes:
        if not values:
            return b")"
        body = b"".join(_int(v) for v in values)
        if len(values) <= 3:
            return body + b"\x85\x86\x87"[len(values) - 1:len(values)] + put()
        return b"(" + body + b"t" + put()

    out = b"\x80\x02" + b"ctorch._utils\n_rebuild_tensor_v2\n" + put()
    out += b"((" + text("storage") + b"ctorch\n" + storage_type.encode() + b"\n" + put()
    out += text("0") + text("cpu") + _int(numel) + b"t" + put() + b"Q"
    out += _int(0) + tup(shape) + tup(stride) + b"\x89"
    out += b"ccollections\nOrderedDict\n" + put() + b")R" + put()
    out += b"t" + put() + b"R" + put() + b"."
    return out


def _int(v: int) -> bytes:
    if 0 <= v < 256:
        return b"K" + bytes([v])
    if 0 <= v < 65536:
        return b"M" + struct.pack("<H", v)
    if -(1 << 31) <= v < (1 << 31):
        return b"J" + struct.pack("<i", v)
    raw = v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw
