"""Read and write safetensors files, with the checksum computed in the same pass as the I/O.

The files are ordinary safetensors files (8-byte little-endian header length, JSON
header, raw tensor bytes), readable by ``safetensors.safe_open`` and by
transformers. Writing goes straight from each tensor's storage to the file, so no
serialized copy of the whole state is ever built. Tensors are laid out by element
size, largest first, so that every tensor starts at an offset aligned to its own
element size and can be viewed in place after a single read.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import struct
from collections.abc import Mapping
from typing import BinaryIO

import torch
import xxhash

from hf_lifecycle.errors import CheckpointCorruptedError, SerializationError

CHECKSUM_ALGORITHM = "xxh3_128"
# Writes larger than this go to the file in one call; smaller ones are gathered first.
_WRITE_BUFFER = 8 * 1024 * 1024
_READ_CHUNK = 64 * 1024 * 1024
# A header larger than this is not something this library wrote: refuse it before allocating.
_MAX_HEADER = 256 * 1024 * 1024

DTYPE_TO_CODE: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.uint16: "U16",
    torch.uint32: "U32",
    torch.uint64: "U64",
    torch.complex64: "C64",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
CODE_TO_DTYPE = {code: dtype for dtype, code in DTYPE_TO_CODE.items()}


@dataclasses.dataclass(frozen=True)
class FileRecord:
    """Size and checksum of one written file, as stored in a checkpoint manifest."""

    size: int
    checksum: str
    algorithm: str = CHECKSUM_ALGORITHM

    def to_dict(self) -> dict[str, object]:
        return {"size": self.size, "algorithm": self.algorithm, "checksum": self.checksum}


def new_hasher() -> xxhash.xxh3_128:
    return xxhash.xxh3_128()


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """Return a zero-copy byte view of a contiguous CPU tensor."""
    flat = tensor.reshape(-1)
    if flat.dtype != torch.uint8:
        flat = flat.view(torch.uint8)
    return memoryview(flat.numpy()).cast("B")


def _prepare(key: str, tensor: object) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise SerializationError(
            f"Value at {key!r} is a {type(tensor).__name__}, not a tensor.", key=key
        )
    if tensor.layout != torch.strided:
        raise SerializationError(
            f"Tensor {key!r} has layout {tensor.layout}; convert it with .to_dense() before saving.",
            key=key,
        )
    if tensor.dtype not in DTYPE_TO_CODE:
        raise SerializationError(
            f"Tensor {key!r} has dtype {tensor.dtype}, which safetensors cannot store; "
            f"cast it to a supported dtype first.",
            key=key,
        )
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.to("cpu")
    if not tensor.is_contiguous():
        tensor = tensor.contiguous()
    return tensor


def _layout(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    # Largest element size first keeps every offset aligned to its tensor's element size.
    order = list(tensors)
    return sorted(order, key=lambda key: -tensors[key].element_size())


def build_header(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None
) -> tuple[bytes, list[str]]:
    order = _layout(tensors)
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for key in order:
        tensor = tensors[key]
        nbytes = tensor.numel() * tensor.element_size()
        header[key] = {
            "dtype": DTYPE_TO_CODE[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    # Pad with spaces so the data section starts on an 8-byte boundary, as safetensors does.
    encoded += b" " * ((8 - len(encoded) % 8) % 8)
    return struct.pack("<Q", len(encoded)) + encoded, order


class _HashingWriter:
    """Buffers small writes, passes large ones through, and hashes every byte once."""

    def __init__(self, handle: BinaryIO) -> None:
        self._handle = handle
        self._hasher = new_hasher()
        self._buffer = bytearray()
        self.size = 0

    def write(self, data: memoryview | bytes) -> None:
        self._hasher.update(data)
        self.size += len(data)
        if len(data) >= _WRITE_BUFFER:
            self._flush_buffer()
            self._handle.write(data)
            return
        self._buffer += data
        if len(self._buffer) >= _WRITE_BUFFER:
            self._flush_buffer()

    def _flush_buffer(self) -> None:
        if self._buffer:
            self._handle.write(self._buffer)
            self._buffer = bytearray()

    def finish(self) -> str:
        self._flush_buffer()
        self._handle.flush()
        return self._hasher.hexdigest()


def write_tensors(
    path: str | os.PathLike[str],
    tensors: Mapping[str, object],
    metadata: Mapping[str, str] | None = None,
    *,
    durable: bool = True,
) -> FileRecord:
    """Write ``tensors`` as a safetensors file at ``path`` (which must not exist) and fsync it."""
    prepared = {key: _prepare(key, value) for key, value in tensors.items()}
    header, order = build_header(prepared, metadata)
    with open(path, "xb", buffering=0) as raw:
        writer = _HashingWriter(raw)
        writer.write(header)
        for key in order:
            tensor = prepared[key]
            if tensor.numel():
                writer.write(tensor_bytes(tensor))
        checksum = writer.finish()
        if durable:
            os.fsync(raw.fileno())
    return FileRecord(size=writer.size, checksum=checksum)


def write_bytes(path: str | os.PathLike[str], data: bytes, *, durable: bool = True) -> FileRecord:
    """Write a small non-tensor file (JSON, config) at ``path`` and return its record."""
    with open(path, "xb", buffering=0) as raw:
        raw.write(data)
        if durable:
            os.fsync(raw.fileno())
    hasher = new_hasher()
    hasher.update(data)
    return FileRecord(size=len(data), checksum=hasher.hexdigest())


def _corrupted(path: str, reason: str) -> CheckpointCorruptedError:
    folder = os.path.dirname(path)
    return CheckpointCorruptedError(
        f"Checkpoint file {path} is corrupted: {reason}.", path=folder, file=path
    )


def checksum_file(path: str | os.PathLike[str]) -> FileRecord:
    """Hash a file in large chunks."""
    hasher = new_hasher()
    size = 0
    with open(path, "rb", buffering=0) as handle:
        buffer = bytearray(min(_READ_CHUNK, max(os.fstat(handle.fileno()).st_size, 1)))
        view = memoryview(buffer)
        while True:
            count = handle.readinto(view)
            if not count:
                break
            hasher.update(view[:count])
            size += count
    return FileRecord(size=size, checksum=hasher.hexdigest())


def read_verified_bytes(path: str | os.PathLike[str], expected: FileRecord | None) -> bytes:
    """Read a small file whole and check it against its manifest record."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        raise _corrupted(path, "the file is missing") from None
    if expected is not None:
        if len(data) != expected.size:
            raise _corrupted(path, f"size is {len(data)} bytes, the manifest records {expected.size}")
        hasher = new_hasher()
        hasher.update(data)
        if hasher.hexdigest() != expected.checksum:
            raise _corrupted(path, "checksum mismatch")
    return data


def _parse_header(path: str, raw: bytes, data_size: int) -> tuple[dict, dict[str, str]]:
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _corrupted(path, f"the safetensors header is not valid JSON ({err})") from err
    if not isinstance(header, dict):
        raise _corrupted(path, "the safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise _corrupted(path, "the safetensors metadata is not a JSON object")
    for key, entry in header.items():
        try:
            dtype = CODE_TO_DTYPE[entry["dtype"]]
            shape = [int(size) for size in entry["shape"]]
            begin, end = (int(offset) for offset in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as err:
            raise _corrupted(path, f"invalid header entry for tensor {key!r}") from err
        numel = 1
        for size in shape:
            if size < 0:
                raise _corrupted(path, f"negative dimension in tensor {key!r}")
            numel *= size
        itemsize = torch.empty((), dtype=dtype).element_size()
        if not 0 <= begin <= end <= data_size or end - begin != numel * itemsize:
            raise _corrupted(path, f"tensor {key!r} does not fit the data section")
        entry["_dtype"] = dtype
        entry["_shape"] = shape
    return header, metadata


def read_tensors(
    path: str | os.PathLike[str], expected: FileRecord | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file into CPU tensors, verifying ``expected`` in the same pass.

    The file is read once into one buffer; tensors are views into it, so no second
    full copy is made. Corruption of any kind raises :class:`CheckpointCorruptedError`
    before a tensor is built.
    """
    path = os.fspath(path)
    try:
        handle = open(path, "rb", buffering=0)
    except FileNotFoundError:
        raise _corrupted(path, "the file is missing") from None
    with handle:
        file_size = os.fstat(handle.fileno()).st_size
        if expected is not None and file_size != expected.size:
            raise _corrupted(
                path, f"size is {file_size} bytes, the manifest records {expected.size}"
            )
        if file_size < 8:
            raise _corrupted(path, "the file is shorter than a safetensors header")
        hasher = new_hasher()
        prefix = _read_exact(handle, 8, path)
        (header_size,) = struct.unpack("<Q", prefix)
        if header_size > min(_MAX_HEADER, file_size - 8):
            raise _corrupted(path, f"the header length {header_size} exceeds the file")
        raw_header = _read_exact(handle, header_size, path)
        hasher.update(prefix)
        hasher.update(raw_header)
        data_size = file_size - 8 - header_size
        buffer = torch.empty(data_size, dtype=torch.uint8)
        if data_size:
            view = memoryview(buffer.numpy()).cast("B")
            position = 0
            while position < data_size:
                count = handle.readinto(view[position : position + _READ_CHUNK])
                if not count:
                    raise _corrupted(path, "the file ended early")
                hasher.update(view[position : position + count])
                position += count
    if expected is not None and hasher.hexdigest() != expected.checksum:
        raise _corrupted(path, "checksum mismatch")
    header, metadata = _parse_header(path, raw_header, data_size)
    tensors: dict[str, torch.Tensor] = {}
    for key, entry in header.items():
        begin, end = entry["data_offsets"]
        dtype, shape = entry["_dtype"], entry["_shape"]
        chunk = buffer[begin:end]
        itemsize = torch.empty((), dtype=dtype).element_size()
        if begin % itemsize:
            chunk = chunk.clone()  # Files written elsewhere may leave tensors unaligned.
        tensors[key] = chunk.view(dtype).reshape(shape) if dtype != torch.uint8 else chunk.reshape(shape)
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def _read_exact(handle: io.RawIOBase, size: int, path: str) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = handle.read(size - len(data))
        if not chunk:
            raise _corrupted(path, "the file ended early")
        data += chunk
    return bytes(data)
