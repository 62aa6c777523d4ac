"""The append-only journal of a correction session: one record per event, flushed and fsynced on append.

File layout: the 8-byte magic ``MSGJRNL1``, then records. A record is a 12-byte little-endian
header (JSON length, payload length, CRC-32 of JSON + payload), the JSON event (UTF-8), and the
payload: the zlib-compressed old and new patches of an edit, one after the other (empty for events
without pixels). A record that is cut short or fails its CRC (a crash while writing) ends the
journal: it and anything after it are ignored on reading and cut off before the next append, so at
most the edit in flight is lost.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from medseg.annotate.edits import Diff
from medseg.errors import InputError

MAGIC = b"MSGJRNL1"
_HEADER = struct.Struct("<III")


@dataclass
class Record:
    event: dict[str, Any]
    diff: Diff | None = None


def encode(event: dict[str, Any], diff: Diff | None = None, level: int = 1) -> bytes:
    """One record's bytes: header, JSON event (with the diff's box and dtype), compressed patches."""
    event = dict(event)
    payload = b""
    if diff is not None:
        event["diff"] = {"y0": diff.y0, "x0": diff.x0, "h": diff.old.shape[0], "w": diff.old.shape[1], "dtype": diff.old.dtype.str}
        payload = zlib.compress(diff.old.tobytes() + diff.new.tobytes(), level)
    body = json.dumps(event, separators=(",", ":")).encode("utf-8")
    return _HEADER.pack(len(body), len(payload), zlib.crc32(payload, zlib.crc32(body))) + body + payload


def _decode_diff(spec: dict[str, Any], payload: bytes) -> Diff:
    h, w, dtype = int(spec["h"]), int(spec["w"]), np.dtype(spec["dtype"])
    raw = zlib.decompress(payload)
    half = h * w * dtype.itemsize
    if len(raw) != 2 * half:
        raise ValueError("patch size does not match its box")
    old = np.frombuffer(raw, dtype, h * w, 0).reshape(h, w).copy()
    new = np.frombuffer(raw, dtype, h * w, half).reshape(h, w).copy()
    return Diff(int(spec["y0"]), int(spec["x0"]), old, new)


def read(path: str | os.PathLike) -> tuple[list[Record], int]:
    """The intact records of a journal and the byte offset where they end (a torn tail is ignored)."""
    path = Path(path)
    if not path.exists():
        return [], 0
    data = path.read_bytes()
    if len(data) < len(MAGIC):
        return [], 0
    if data[: len(MAGIC)] != MAGIC:
        raise InputError(f"'{path}' is not a medseg correction journal: move it away or choose another session folder.")
    records: list[Record] = []
    pos = len(MAGIC)
    while pos + _HEADER.size <= len(data):
        n_body, n_payload, crc = _HEADER.unpack_from(data, pos)
        start, end = pos + _HEADER.size, pos + _HEADER.size + n_body + n_payload
        if end > len(data):
            break
        body, payload = data[start : start + n_body], data[start + n_body : end]
        if zlib.crc32(payload, zlib.crc32(body)) != crc:
            break
        try:
            event = json.loads(body.decode("utf-8"))
            diff = _decode_diff(event.pop("diff"), payload) if "diff" in event else None
        except (ValueError, KeyError, zlib.error):
            break
        records.append(Record(event, diff))
        pos = end
    return records, pos


class JournalWriter:
    """Appends records durably: each append is written, flushed and fsynced before it returns."""

    def __init__(self, path: str | os.PathLike, valid_end: int | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not self.path.exists() or self.path.stat().st_size < len(MAGIC)
        self._fh = open(self.path, "r+b" if not fresh else "wb")
        if fresh:
            self._fh.write(MAGIC)
        else:
            end = valid_end if valid_end is not None else read(self.path)[1]
            self._fh.truncate(max(end, len(MAGIC)))  # cut a torn record off before appending after it
            self._fh.seek(0, os.SEEK_END)
        self._sync()
        self.bytes_written = 0

    def append(self, event: dict[str, Any], diff: Diff | None = None) -> int:
        """Write one record durably; returns its size in bytes."""
        blob = encode(event, diff)
        self._fh.write(blob)
        self._sync()
        self.bytes_written += len(blob)
        return len(blob)

    def _sync(self) -> None:
        self._fh.flush()
        os.fsync(self._fh.fileno())

    @property
    def size(self) -> int:
        return self._fh.tell()

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()


def iter_events(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    for rec in read(path)[0]:
        yield rec.event


__all__ = ["JournalWriter", "MAGIC", "Record", "encode", "iter_events", "read"]
