"""The safetensors writer and reader: format, checksums, batching, write-behind and failures."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import struct
import sys
import threading

import numpy as np
import pytest
import torch
import xxhash
from safetensors import safe_open

from hf_lifecycle.checkpoint import tensorfile
from hf_lifecycle.checkpoint.tensorfile import (
    FileRecord,
    checksum_file,
    read_tensors,
    tensor_bytes,
    write_tensors,
)
from hf_lifecycle.errors import CheckpointCorruptedError


def sample_tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(3, 5, generator=generator),
        "f64": torch.randn(4, generator=generator, dtype=torch.float64),
        "f16": torch.randn(6, generator=generator).to(torch.float16),
        "bf16": torch.randn(2, 3, generator=generator).to(torch.bfloat16),
        "i64": torch.arange(7),
        "i16": torch.arange(-3, 3, dtype=torch.int16),
        "i8": torch.arange(-4, 4, dtype=torch.int8),
        "u8": torch.arange(9, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(2, 0),
        "transposed": torch.randn(4, 3, generator=generator).t(),
        "large": torch.randn(50_000, generator=generator),
    }


def assert_same(loaded: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(loaded) == sorted(expected)
    for key, tensor in expected.items():
        assert loaded[key].dtype == tensor.dtype, key
        assert loaded[key].shape == tensor.shape, key
        assert torch.equal(loaded[key], tensor), key


@pytest.fixture
def small_chunks(monkeypatch):
    """Shrink the write chunk and the threaded-hash threshold so a small file takes every path."""
    monkeypatch.setattr(tensorfile, "_CHUNK", 4096)
    monkeypatch.setattr(tensorfile, "_THREADED_HASH_MIN", 1)
    monkeypatch.setattr(tensorfile, "_THREADED_HASH_MIN_VIEW", 1)


@pytest.fixture(params=["default", "small_chunks"])
def chunking(request) -> str:
    """Run a test with the default chunk sizes and again with ``small_chunks``."""
    if request.param == "small_chunks":
        request.getfixturevalue("small_chunks")
    return request.param


class FakeSyncFileRange:
    """Stands in for libc's sync_file_range: records calls and fails with ``error`` if set."""

    def __init__(self, error: int = 0) -> None:
        self.error = error
        self.calls: list[tuple[int, int, int]] = []

    def __call__(self, fd: int, offset: int, length: int, flags: int) -> int:
        self.calls.append((offset, length, flags))
        if self.error:
            ctypes.set_errno(self.error)
            return -1
        return 0


def install_sync_file_range(monkeypatch, fake: FakeSyncFileRange) -> None:
    monkeypatch.setattr(tensorfile, "_libc_sync_file_range", lambda: fake)


# Format and checksums ------------------------------------------------------------------------


def test_round_trip_every_dtype(tmp_path, chunking):
    tensors = sample_tensors()
    write_tensors(tmp_path / "t.safetensors", tensors, {"note": "hello"})
    loaded, metadata = read_tensors(tmp_path / "t.safetensors")
    assert_same(loaded, tensors)
    assert metadata == {"note": "hello"}


def test_record_matches_file_bytes(tmp_path, chunking):
    path = tmp_path / "t.safetensors"
    record = write_tensors(path, sample_tensors())
    data = path.read_bytes()
    assert record.size == len(data)
    assert record.checksum == xxhash.xxh3_128(data).hexdigest()
    assert checksum_file(path) == record


def test_safe_open_reads_the_file(tmp_path, small_chunks):
    tensors = sample_tensors()
    path = tmp_path / "t.safetensors"
    write_tensors(path, tensors, {"format": "pt"})
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}
        loaded = {key: handle.get_tensor(key) for key in handle.keys()}
    assert_same(loaded, tensors)


def test_layout_aligns_every_tensor(tmp_path):
    path = tmp_path / "t.safetensors"
    write_tensors(path, sample_tensors())
    data = path.read_bytes()
    (header_size,) = struct.unpack("<Q", data[:8])
    assert (8 + header_size) % 8 == 0
    header = json.loads(data[8 : 8 + header_size])
    header.pop("__metadata__", None)
    for key, entry in header.items():
        itemsize = tensorfile.CODE_TO_DTYPE[entry["dtype"]].itemsize
        assert entry["data_offsets"][0] % itemsize == 0, key


def test_tensor_bytes_matches_uint8_view():
    for tensor in sample_tensors().values():
        tensor = tensor.contiguous()
        expected = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
        view = tensor_bytes(tensor)
        assert view.format == "B"
        assert view.ndim == 1
        assert bytes(view) == expected


def test_batch_count_limit_round_trip(tmp_path, monkeypatch):
    monkeypatch.setattr(tensorfile, "_IOV_MAX", 7)
    tensors = {f"t{index}": torch.full((index % 5 + 1,), float(index)) for index in range(100)}
    path = tmp_path / "t.safetensors"
    record = write_tensors(path, tensors)
    assert checksum_file(path) == record
    assert_same(read_tensors(path, record)[0], tensors)


def test_batches_respect_chunk_and_count(monkeypatch):
    monkeypatch.setattr(tensorfile, "_CHUNK", 10)
    monkeypatch.setattr(tensorfile, "_IOV_MAX", 3)
    arrays = [np.arange(size, dtype=np.uint8) for size in (4, 25, 1, 1, 1, 1, 3)]
    arrays.append(np.arange(6, dtype=np.float32).reshape(2, 3))
    batches = list(tensorfile._batches(arrays))
    for batch in batches:
        assert sum(array.nbytes for array in batch) <= 10
        assert len(batch) <= 3
    joined = b"".join(array.tobytes() for batch in batches for array in batch)
    assert joined == b"".join(array.tobytes() for array in arrays)


# Writing: short writes, errors, write-behind -------------------------------------------------


def test_short_writes_are_resumed(tmp_path, monkeypatch, small_chunks):
    def short_writev(fd, arrays):
        return os.writev(fd, [arrays[0].reshape(-1).view(np.uint8)[:1000]])

    monkeypatch.setattr(tensorfile, "_writev", short_writev)
    tensors = sample_tensors()
    path = tmp_path / "t.safetensors"
    record = write_tensors(path, tensors)
    assert checksum_file(path) == record
    assert_same(read_tensors(path, record)[0], tensors)


def test_write_without_writev(tmp_path, monkeypatch, small_chunks):
    monkeypatch.setattr(tensorfile, "_writev", None)
    tensors = sample_tensors()
    path = tmp_path / "t.safetensors"
    record = write_tensors(path, tensors)
    assert_same(read_tensors(path, record)[0], tensors)


def test_write_error_stops_hash_thread(tmp_path, monkeypatch, small_chunks):
    def failing_writev(fd, arrays):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tensorfile, "_writev", failing_writev)
    with pytest.raises(OSError) as raised:
        write_tensors(tmp_path / "t.safetensors", sample_tensors())
    assert raised.value.errno == errno.ENOSPC
    assert not [thread for thread in threading.enumerate() if thread.name == "checksum"]


def test_existing_file_is_not_overwritten(tmp_path):
    path = tmp_path / "t.safetensors"
    path.write_bytes(b"keep")
    with pytest.raises(FileExistsError):
        write_tensors(path, sample_tensors())
    assert path.read_bytes() == b"keep"


def test_write_behind_covers_file_in_order(tmp_path, monkeypatch, small_chunks):
    monkeypatch.setattr(tensorfile, "_IOV_MAX", 3)  # Batches far smaller than a chunk.
    fake = FakeSyncFileRange()
    install_sync_file_range(monkeypatch, fake)
    path = tmp_path / "t.safetensors"
    record = write_tensors(path, sample_tensors())
    started = [(offset, length) for offset, length, flags in fake.calls if flags == 2]
    waited = [(offset, length) for offset, length, flags in fake.calls if flags == 7]
    position = 0
    for offset, length in started:
        assert offset == position
        assert length >= tensorfile._CHUNK
        position += length
    # The tail shorter than a chunk is left to the final fsync.
    assert record.size - tensorfile._CHUNK < position <= record.size
    assert waited == started[: len(started) - tensorfile._WRITE_BEHIND]


def test_write_behind_error_fails_write(tmp_path, monkeypatch, small_chunks):
    install_sync_file_range(monkeypatch, FakeSyncFileRange(errno.EIO))
    with pytest.raises(OSError) as raised:
        write_tensors(tmp_path / "t.safetensors", sample_tensors())
    assert raised.value.errno == errno.EIO


def test_write_behind_unsupported_is_skipped(tmp_path, monkeypatch, small_chunks):
    fake = FakeSyncFileRange(errno.EINVAL)
    install_sync_file_range(monkeypatch, fake)
    tensors = sample_tensors()
    path = tmp_path / "t.safetensors"
    record = write_tensors(path, tensors)
    assert len(fake.calls) == 1
    assert_same(read_tensors(path, record)[0], tensors)


def test_not_durable_skips_write_behind(tmp_path, monkeypatch, small_chunks):
    fake = FakeSyncFileRange()
    install_sync_file_range(monkeypatch, fake)
    write_tensors(tmp_path / "t.safetensors", sample_tensors(), durable=False)
    assert fake.calls == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range is Linux only")
def test_libc_sync_file_range_found_on_linux():
    assert tensorfile._libc_sync_file_range() is not None


# Reading -------------------------------------------------------------------------------------


def test_loaded_tensors_share_one_buffer(tmp_path):
    tensors = {"a": torch.randn(10), "b": torch.randn(3, 4), "c": torch.arange(5)}
    path = tmp_path / "t.safetensors"
    record = write_tensors(path, tensors)
    loaded, _ = read_tensors(path, record)
    pointers = {tensor.untyped_storage().data_ptr() for tensor in loaded.values()}
    assert len(pointers) == 1
    for tensor in loaded.values():
        assert tensor.is_contiguous()


def test_flipped_byte_is_detected(tmp_path, chunking):
    path = tmp_path / "t.safetensors"
    record = write_tensors(path, sample_tensors())
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointCorruptedError, match="checksum mismatch"):
        read_tensors(path, record)


def test_truncated_file_is_detected(tmp_path):
    path = tmp_path / "t.safetensors"
    record = write_tensors(path, sample_tensors())
    os.truncate(path, record.size - 10)
    with pytest.raises(CheckpointCorruptedError, match="size is"):
        read_tensors(path, record)
    with pytest.raises(CheckpointCorruptedError, match="does not fit"):
        read_tensors(path)


def test_wrong_record_is_detected(tmp_path):
    path = tmp_path / "t.safetensors"
    record = write_tensors(path, sample_tensors())
    with pytest.raises(CheckpointCorruptedError, match="checksum mismatch"):
        read_tensors(path, FileRecord(size=record.size, checksum="0" * 32))


def test_unaligned_tensor_from_another_writer(tmp_path):
    # One U8 byte, then an F32 tensor at data offset 1: valid safetensors, but unaligned.
    values = torch.tensor([1.5, -2.0, 3.25])
    header = {
        "flag": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
        "values": {"dtype": "F32", "shape": [3], "data_offsets": [1, 13]},
    }
    encoded = json.dumps(header).encode()
    encoded += b" " * ((8 - len(encoded) % 8) % 8)
    data = bytes([7]) + values.numpy().tobytes()
    path = tmp_path / "t.safetensors"
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)
    loaded, _ = read_tensors(path, checksum_file(path))
    assert loaded["flag"].tolist() == [7]
    assert torch.equal(loaded["values"], values)
    assert loaded["values"].data_ptr() % 4 == 0


def test_read_without_preadv(tmp_path, monkeypatch, small_chunks):
    monkeypatch.setattr(tensorfile, "_preadv", None)
    tensors = sample_tensors()
    path = tmp_path / "t.safetensors"
    record = write_tensors(path, tensors)
    assert_same(read_tensors(path, record)[0], tensors)


def read_threads_alive() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "checkpoint-read"]


def test_parallel_read_stops_at_end_of_file(tmp_path, monkeypatch, small_chunks):
    path = tmp_path / "t.safetensors"
    record = write_tensors(path, sample_tensors())
    real_preadv = os.preadv

    def preadv_ending_early(fd, buffers, offset):
        if offset > record.size // 2:
            return 0
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(tensorfile, "_preadv", preadv_ending_early)
    with pytest.raises(CheckpointCorruptedError, match="ended early"):
        read_tensors(path, record)
    assert not read_threads_alive()


def test_parallel_read_error_is_raised(tmp_path, monkeypatch, small_chunks):
    path = tmp_path / "t.safetensors"
    record = write_tensors(path, sample_tensors())

    def failing_preadv(fd, buffers, offset):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(tensorfile, "_preadv", failing_preadv)
    with pytest.raises(OSError) as raised:
        read_tensors(path, record)
    assert raised.value.errno == errno.EIO
    assert not read_threads_alive()


def test_header_matches_json_dumps():
    tensors = {key: tensor.contiguous() for key, tensor in sample_tensors().items()}
    tensors["naïve \"quoted\" key"] = torch.ones(2)
    metadata = {"format": "pt", "note": "ünïcode"}
    header, order = tensorfile.build_header(tensors, metadata)
    expected: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for key in order:
        end = offset + tensors[key].numel() * tensors[key].element_size()
        expected[key] = {
            "dtype": tensorfile.DTYPE_TO_CODE[tensors[key].dtype],
            "shape": list(tensors[key].shape),
            "data_offsets": [offset, end],
        }
        offset = end
    encoded = json.dumps(expected, separators=(",", ":")).encode("utf-8")
    (length,) = struct.unpack("<Q", header[:8])
    assert header[8 : 8 + len(encoded)] == encoded
    assert header[8 + len(encoded) :] == b" " * (length - len(encoded))
    assert length % 8 == 0
