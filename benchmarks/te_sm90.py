"""Shrink Transformer Engine's core wheel to what a Hopper GPU loads, so that it fits one device call (64 MiB).

    python3 benchmarks/te_sm90.py transformer_engine_cu13-2.20.2-py3-none-manylinux_2_28_x86_64.whl OUT.tar.xz

libtransformer_engine.so (343 MB) holds each CUDA kernel as machine code for sm_75, 80, 89, 90, 100, 103, 107 and
120, in fatbin containers (magic 0xBA55ED50, a 16-byte header, then entries of a 64-byte-or-longer header with kind
at 0, header size at 4, payload size at 8 and the architecture at 28). The CUDA driver loads the entry that matches
the device, sm_90 on an H100/H200, and reads no other. This zeroes the payload of every machine-code entry for
another architecture (headers, offsets and the file's size unchanged, every container checked to keep an sm_90
entry) and writes the wheel's files as an xz tar: 27 MB instead of 277 MB. Only for a Hopper machine: on any other
GPU the library would find no kernel it can run.
"""
from __future__ import annotations

import io
import struct
import sys
import tarfile
import zipfile

MAGIC = struct.pack("<I", 0xBA55ED50)
KEEP = 90
ELF = 2  # entry kind: machine code (1 is PTX)


def keep_only_sm90(data: bytearray) -> tuple[int, int]:
    """Zero other architectures' machine code in place; returns (containers, bytes zeroed)."""
    containers = zeroed = 0
    i = 0
    while (j := data.find(MAGIC, i)) >= 0:
        _, header, size = struct.unpack_from("<HHQ", data, j + 4)
        if header != 16 or j + header + size > len(data):  # the magic's bytes inside something else
            i = j + 4
            continue
        p, end, has_sm90 = j + header, j + header + size, False
        while p < end:
            kind, _, entry_header = struct.unpack_from("<HHI", data, p)
            (payload,) = struct.unpack_from("<Q", data, p + 8)
            (arch,) = struct.unpack_from("<I", data, p + 28)
            has_sm90 |= arch == KEEP
            if kind == ELF and arch != KEEP:
                data[p + entry_header:p + entry_header + payload] = bytes(payload)
                zeroed += payload
            p += entry_header + payload
        if p != end or not has_sm90:
            raise SystemExit(f"fatbin container at {j}: unexpected layout (ends at {p}, expected {end}; sm_90 entry: "
                             f"{has_sm90}); not shrinking")
        containers += 1
        i = end
    return containers, zeroed


def main(wheel: str, out: str) -> None:
    with zipfile.ZipFile(wheel) as z, tarfile.open(out, "w:xz") as tar:
        for info in z.infolist():
            data = z.read(info)
            if info.filename.endswith("wheel_lib/libtransformer_engine.so"):
                buf = bytearray(data)
                containers, zeroed = keep_only_sm90(buf)
                data = bytes(buf)
                print(f"{info.filename}: {containers} fatbin containers, {zeroed / 1e6:.1f} MB of other "
                      f"architectures' code zeroed")
            member = tarfile.TarInfo(info.filename)
            member.size, member.mode = len(data), 0o755 if info.filename.endswith(".so") else 0o644
            tar.addfile(member, io.BytesIO(data))


if __name__ == "__main__":
    main(*sys.argv[1:3])
