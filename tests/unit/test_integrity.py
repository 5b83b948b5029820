"""checkpoint/integrity.py on a directory shaped like a checkpoint: what `record` writes and what `check` finds.

The digests are checked against xxhash computed here on the whole file at once; the damage is a flipped byte, a
truncation, a lost file, an added file, and a damaged or missing `checksums.json`.
"""
from __future__ import annotations

import json
import os

import pytest
import xxhash

from llamapro_megatron.checkpoint import integrity
from llamapro_megatron.errors import UserError


@pytest.fixture
def ckpt(tmp_path):
    d = tmp_path / "release"
    (d / "tokenizer").mkdir(parents=True)
    # larger than one read block, and not a multiple of it: the block loop and its tail both count
    (d / "__0_0.distcp").write_bytes(os.urandom(integrity._BLOCK + 12345))
    (d / "__0_1.distcp").write_bytes(b"")
    (d / ".metadata").write_bytes(os.urandom(999))
    (d / "llamapro.json").write_text("{}")
    (d / "tokenizer" / "tokenizer.model").write_bytes(b"spm")
    return d


def test_record_lists_every_file_with_its_size_and_digest(ckpt):
    integrity.record(ckpt, {"__0_1.distcp": xxhash.xxh3_64(b"").hexdigest()})
    data = json.loads((ckpt / integrity.CHECKSUMS_FILE).read_text())
    assert data["algorithm"] == "xxh3_64"
    assert sorted(data["files"]) == [".metadata", "__0_0.distcp", "__0_1.distcp", "llamapro.json",
                                     "tokenizer/tokenizer.model"]
    for rel, entry in data["files"].items():
        raw = (ckpt / rel).read_bytes()
        assert entry == {"size": len(raw), "xxh3_64": xxhash.xxh3_64(raw).hexdigest()}, rel
    report = integrity.check(ckpt)
    assert report.ok and report.files == 5 and report.bytes == sum(e["size"] for e in data["files"].values())


def test_a_flipped_byte_is_named_by_file(ckpt):
    integrity.record(ckpt)
    path = ckpt / "__0_0.distcp"
    raw = bytearray(path.read_bytes())
    raw[integrity._BLOCK + 7] ^= 0x01  # in the last, partial block
    path.write_bytes(raw)
    report = integrity.check(ckpt)
    assert report.problems == ["__0_0.distcp: contents differ from the checksum recorded at save time"]


def test_truncated_lost_and_added_files_are_each_named(ckpt):
    integrity.record(ckpt)
    with open(ckpt / "__0_0.distcp", "r+b") as f:
        f.truncate(100)
    (ckpt / "tokenizer" / "tokenizer.model").unlink()
    (ckpt / "__9_9.distcp").write_bytes(b"x")
    problems = integrity.check(ckpt).problems
    assert problems == [
        "__9_9.distcp: not among the files recorded at save time",
        f"__0_0.distcp: 100 bytes, {integrity._BLOCK + 12345} recorded at save time",
        "tokenizer/tokenizer.model: missing",
    ]


def test_without_checksums_the_check_says_what_it_cannot_do(ckpt):
    with pytest.raises(UserError, match="records no checksums"):
        integrity.check(ckpt)


@pytest.mark.parametrize("text", ["not json", '{"algorithm": "md5", "files": {}}', '{"algorithm": "xxh3_64"}',
                                  '{"algorithm": "xxh3_64", "files": {"../x": {"size": 1, "xxh3_64": "0"}}}',
                                  '{"algorithm": "xxh3_64", "files": {"a": {"size": "1", "xxh3_64": "0"}}}',
                                  '{"algorithm": "xxh3_64", "files": {"a": 3}}'])
def test_a_damaged_checksums_file_is_reported_not_trusted(ckpt, text):
    (ckpt / integrity.CHECKSUMS_FILE).write_text(text)
    with pytest.raises(UserError, match="checksums.json is damaged"):
        integrity.check(ckpt)
