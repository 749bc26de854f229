"""TensorBoard event files, written with the standard library (no tensorboard in the image).

An event file is a TFRecord stream: each record is its length (little-endian uint64), the
masked CRC-32C of those 8 bytes, the bytes of one `tensorflow.Event` protocol buffer, and the
masked CRC-32C of those bytes. The first event names the format ("brain.Event:2"); each later
one holds a step and a `Summary` of scalars (`simple_value`, a float32), as TensorBoard's own
writers (torch.utils.tensorboard, tensorboardX) write them. The few protobuf fields used are
encoded here by hand; the tests read the files back with TensorBoard's own reader.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Mapping
from pathlib import Path

FILE_VERSION = "brain.Event:2"
_CRC_MASK_DELTA = 0xA282EAD8


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1  # Castagnoli, reflected
        table.append(crc)
    return tuple(table)


_CRC32C = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """The CRC as TFRecord stores it (rotated and offset, so a CRC of CRCs stays strong)."""
    crc = crc32c(data)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + _CRC_MASK_DELTA) & 0xFFFFFFFF


def record(data: bytes) -> bytes:
    """One TFRecord: length, its masked CRC, the data, the data's masked CRC."""
    length = struct.pack("<Q", len(data))
    return (length + struct.pack("<I", masked_crc32c(length)) + data
            + struct.pack("<I", masked_crc32c(data)))  # fmt: skip


# -- the protobuf wire format, for the fields an event of scalars uses
def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # int64 as protobuf encodes it (negative: ten bytes)
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


def _bytes_field(field: int, data: bytes) -> bytes:
    return _key(field, 2) + _varint(len(data)) + data


def scalar_value(tag: str, value: float) -> bytes:
    """Summary.Value {tag = 1; simple_value = 2 (float)}."""
    return _bytes_field(1, tag.encode("utf-8")) + _key(2, 5) + struct.pack("<f", value)


def event(wall_time: float, step: int, *, file_version: str | None = None,
          summary_values: list[bytes] | None = None) -> bytes:  # fmt: skip
    """Event {wall_time = 1 (double); step = 2 (int64); file_version = 3; summary = 5}."""
    data = _key(1, 1) + struct.pack("<d", wall_time) + _key(2, 0) + _varint(step)
    if file_version is not None:
        data += _bytes_field(3, file_version.encode("utf-8"))
    if summary_values:
        summary = b"".join(_bytes_field(1, value) for value in summary_values)
        data += _bytes_field(5, summary)
    return data


class EventWriter:
    """Appends scalar events to a new event file in `directory` (created if missing), flushed
    after every write so TensorBoard shows a run while it goes and a kill loses nothing."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        now = time.time()
        name = f"events.out.tfevents.{int(now):010d}.{socket.gethostname()}.{os.getpid()}.0"
        self.path = directory / name
        self._file = open(self.path, "ab")  # noqa: SIM115 (open for the run's length)
        self._write(event(now, 0, file_version=FILE_VERSION))

    def scalars(
        self, step: int, values: Mapping[str, float], wall_time: float | None = None
    ) -> None:
        if not values:
            return
        items = [scalar_value(tag, float(value)) for tag, value in values.items()]
        self._write(event(time.time() if wall_time is None else wall_time, step,
                          summary_values=items))  # fmt: skip

    def _write(self, data: bytes) -> None:
        self._file.write(record(data))
        self._file.flush()

    def close(self) -> None:
        self._file.close()
