"""TensorBoard scalars without TensorFlow: event files written directly.

An event file is a TFRecord file (length, masked CRC-32C of the length, payload, masked
CRC-32C of the payload) of `Event` protocol buffers; scalars need only a few of their
fields, encoded here by hand, so training never imports TensorFlow (seconds and hundreds
of MB) or needs the `tensorboard` package.
"""
import json
import os
import socket
import struct
import time

from allflax import files

_CRC32C_POLYNOMIAL = 0x82F63B78  # Castagnoli, reflected.


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (_CRC32C_POLYNOMIAL if crc & 1 else 0)
        table.append(crc)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _length_delimited(field: int, payload: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def _event(step: int, *, file_version: str | None = None, scalars: dict[str, float] | None = None) -> bytes:
    """Event{wall_time=1 (double), step=2 (int64), file_version=3 | summary=5}; Summary{value=1};
    Value{tag=1, simple_value=2 (float)}."""
    event = b'\x09' + struct.pack('<d', time.time()) + b'\x10' + _varint(step)
    if file_version is not None:
        return event + _length_delimited(3, file_version.encode())
    values = b''.join(_length_delimited(1, _length_delimited(1, tag.encode()) + b'\x15' + struct.pack('<f', value))
                      for tag, value in scalars.items())
    return event + _length_delimited(5, values)


def tag_of(key: str) -> str:
    """metrics.jsonl keys to TensorBoard tags: train_loss → train/loss, so splits group together."""
    for prefix in ('train_', 'val_'):
        if key.startswith(prefix):
            return prefix[:-1] + '/' + key[len(prefix):]
    return key


class SummaryWriter:
    """Appends scalars to a new event file in `directory` (process 0 only; a no-op elsewhere)."""

    def __init__(self, directory: str):
        self._file = None
        if not files.is_writer():
            return
        os.makedirs(directory, exist_ok=True)
        name = f'events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}'
        self._file = open(os.path.join(directory, name), 'ab')
        self._write(_event(0, file_version='brain.Event:2'))

    def _write(self, record: bytes):
        length = struct.pack('<Q', len(record))
        self._file.write(length + struct.pack('<I', _masked_crc(length)) + record
                         + struct.pack('<I', _masked_crc(record)))
        self._file.flush()

    def write(self, record: dict):
        """Writes every number of a metrics.jsonl record except its 'step', at that step."""
        if self._file is None:
            return
        scalars = {tag_of(key): float(value) for key, value in record.items()
                   if key != 'step' and isinstance(value, (int, float))}
        self._write(_event(int(record['step']), scalars=scalars))

    def close(self):
        if self._file is not None:
            self._file.close()
            self._file = None


class MetricsLog:
    """Appends each record to `workdir/metrics.jsonl` and to TensorBoard, from process 0 only."""

    def __init__(self, workdir: str):
        self._path = os.path.join(workdir, 'metrics.jsonl')
        self._tensorboard = SummaryWriter(os.path.join(workdir, 'tensorboard'))

    def write(self, record: dict):
        if files.is_writer():
            with open(self._path, 'a') as f:
                f.write(json.dumps(record) + '\n')
        self._tensorboard.write(record)

    def close(self):
        self._tensorboard.close()
