"""Shrink Transformer Engine's core wheel to what a Hopper GPU loads, so that it fits one device call (64 MiB).

    python3 benchmarks/te_sm90.py transformer_engine_cu13-2.20.2-py3-none-manylinux_2_28_x86_64.whl OUT.tar.xz

libtransformer_engine.so (343 MB) holds each CUDA kernel as machine code for sm_75, 80, 89, 90, 100, 103, 107 and
120, in 89 fatbin containers (magic 0xBA55ED50, a 16-byte header, then entries: a 64-byte header with the kind at
byte 0, header size at 4, padded payload size at 8, compressed size at 16, the architecture at 28, flags at 40 and
the uncompressed size at 56; each payload a zstd-compressed ELF cubin). The CUDA driver loads the entry that matches
the device, sm_90 on an H100/H200. This gives every other architecture's entry the smallest cubin of that
architecture (and flags) found in the library, a valid one, with its sizes (the padded size and every offset
unchanged; every container checked to keep its sm_90 entry), so NVIDIA's cuobjdump still reads every entry and the
sm_90 cubins it extracts are the original ones; the wheel's files are written as an xz tar: 27 MB instead of 277 MB.
Only for a Hopper machine: on another GPU the kernels would not be found.
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


def _entries(data: bytearray):
    """Every fatbin container's (offset, [(entry offset, header size, padded size, arch, flags)]) of `data`."""
    i = 0
    while (j := data.find(MAGIC, i)) >= 0:
        _, header, size = struct.unpack_from("<HHQ", data, j + 4)
        if header != 16 or j + header + size > len(data):  # the magic's bytes inside something else
            i = j + 4
            continue
        p, end, entries = j + header, j + header + size, []
        while p < end:
            kind, _, entry_header = struct.unpack_from("<HHI", data, p)
            (payload,) = struct.unpack_from("<Q", data, p + 8)
            (arch,) = struct.unpack_from("<I", data, p + 28)
            (flags,) = struct.unpack_from("<Q", data, p + 40)
            if kind == ELF:
                entries.append((p, entry_header, payload, arch, flags))
            p += entry_header + payload
        if p != end:
            raise SystemExit(f"fatbin container at {j}: entries end at {p}, expected {end}; not shrinking")
        yield j, entries
        i = end


def keep_only_sm90(data: bytearray) -> tuple[int, int]:
    """Give every machine-code entry for another architecture than sm_90 the smallest cubin of its own architecture
    (and flags) in the library, in place; returns (containers, payload bytes replaced)."""
    containers = list(_entries(data))
    donors: dict = {}  # (arch, flags) -> (compressed size, entry offset): the smallest such cubin
    for _, entries in containers:
        if not any(arch == KEEP for _, _, _, arch, _ in entries):
            raise SystemExit("a fatbin container has no sm_90 entry; not shrinking")
        for p, _, _, arch, flags in entries:
            (compressed,) = struct.unpack_from("<I", data, p + 16)
            donors[arch, flags] = min(donors.get((arch, flags), (compressed, p)), (compressed, p))
    replaced = 0
    for _, entries in containers:
        for p, header, payload, arch, flags in entries:
            compressed, donor = donors[arch, flags]
            if arch == KEEP or donor == p:
                continue
            (uncompressed,) = struct.unpack_from("<Q", data, donor + 56)
            cubin = bytes(data[donor + header:donor + header + compressed])
            data[p + header:p + header + payload] = cubin + bytes(payload - compressed)
            struct.pack_into("<I", data, p + 16, compressed)
            struct.pack_into("<Q", data, p + 56, uncompressed)
            replaced += payload
    return len(containers), replaced


def main(wheel: str, out: str) -> None:
    with zipfile.ZipFile(wheel) as z, tarfile.open(out, "w:xz") as tar:
        for info in z.infolist():
            data = z.read(info)
            if info.filename.endswith("wheel_lib/libtransformer_engine.so"):
                buf = bytearray(data)
                containers, zeroed = keep_only_sm90(buf)
                data = bytes(buf)
                print(f"{info.filename}: {containers} fatbin containers, {zeroed / 1e6:.1f} MB of other "
                      f"architectures' code replaced")
            member = tarfile.TarInfo(info.filename)
            member.size, member.mode = len(data), 0o755 if info.filename.endswith(".so") else 0o644
            tar.addfile(member, io.BytesIO(data))


if __name__ == "__main__":
    main(*sys.argv[1:3])
