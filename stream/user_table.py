"""The users a worker process owns, readable by the other processes in shared memory.

With ``streamrec worker --processes N`` a request lands on whichever process
the kernel hands its connection to, but only the process that owns the user's
partition holds the user's state in its store. Each process therefore writes
every user it applies into a table of its own in shared memory (a file under
``/dev/shm``, one per process, written by that process alone), and the others
read it: a request for a user another process owns is answered where it
landed, from the state its owner applied last. A user the table does not hold
(not applied since its owner started, a full table, a state too large for a
slot, another model version: after a hot swap the owner writes its users
again, ``stream.swap``) is passed on to the owner as before, so the table only
ever saves the hop; it never decides what is served.

Layout: a header (magic, slot count, slot size, retired flag), the slots' keys
(``int64``, 0 = empty; open addressing, linear probing), each slot's head
(``uint32`` sequence, record length, CRC-32 of the record) and the records.
One writer per table, so a slot needs no lock: the writer makes the sequence
odd, writes the record, makes it even again, and only then publishes the key
of a new slot; a reader copies the record between two reads of an equal, even
sequence and checks its CRC and the user id inside it, retrying a few times
and otherwise passing the request on. A record is the user id, the users
collection it belongs to (one per model version), the sequence of items and
searches, the time of the latest event and the user vector.

A restarted owner clears its table in place before it applies anything (a
batch it applied before a crash but had not yet written here is skipped as a
redelivery, and would otherwise leave an older state behind); the supervisor
removes every table of its data dir when it starts and stops. A table whose
geometry changed is marked retired before it is replaced, and a reader that
sees the mark opens the new one.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from core.errors import ConfigError

SHM_DIR = Path("/dev/shm")
MAGIC = 0x5352555345525431  # "SRUSERT1"
HEADER = np.dtype([("magic", "<u8"), ("slots", "<u8"), ("slot_bytes", "<u8"), ("retired", "<u8")])
HEAD_FIELDS = 4  # per slot: sequence, record length, CRC-32, unused
MAX_LOAD = 0.75  # a table this full takes no new users (they are passed on)
MAX_PROBES = 64
READ_ATTEMPTS = 3
_LENGTHS = struct.Struct("<II")  # meta JSON bytes, vector bytes


class Applied(Protocol):
    """What the table keeps of a user state (``stream.users.UserState``)."""

    user_id: str
    items: list[str]
    last_event_time: float


@dataclass(frozen=True)
class TableUser:
    """A user as its owner applied it last: what a request reads of a user."""

    user_id: str
    items: list[str]  # oldest first, searches as their query entries
    last_event_time: float
    vector: np.ndarray | None  # None: no vector yet (served as cold)
    collection: str  # the users collection the owner stored it in
    version: str  # the model version whose space the vector is in


def user_key(user_id: str) -> int:
    """The table key of ``user_id``: a non-zero signed 64-bit hash."""
    key = int.from_bytes(hashlib.blake2b(user_id.encode(), digest_size=8).digest(), "little", signed=True)
    return key or 1


def table_path(root: Path, index: int) -> Path:
    """The shared-memory file of process ``index`` of the worker whose data dir is ``root``."""
    digest = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:16]
    return SHM_DIR / f"streamrec-{digest}-users-{index}"


def remove_tables(root: Path, count: int) -> None:
    """Remove the tables of every process of the worker on data dir ``root`` (supervisor start and stop)."""
    for index in range(count):
        with contextlib.suppress(FileNotFoundError):
            table_path(root, index).unlink()


def encode(collection: str, version: str, state: Applied, vector: np.ndarray | None) -> bytes:
    meta = json.dumps({"u": state.user_id, "c": collection, "v": version, "i": state.items,
                       "t": state.last_event_time},
                      separators=(",", ":")).encode()
    vec = b"" if vector is None else np.ascontiguousarray(vector, np.float32).tobytes()
    return _LENGTHS.pack(len(meta), len(vec)) + meta + vec


def decode(record: bytes) -> TableUser:
    meta_len, vec_len = _LENGTHS.unpack_from(record)
    meta = json.loads(record[_LENGTHS.size:_LENGTHS.size + meta_len])
    start = _LENGTHS.size + meta_len
    vector = np.frombuffer(record, np.float32, vec_len // 4, start).copy() if vec_len else None
    return TableUser(meta["u"], meta["i"], meta["t"], vector, meta["c"], meta["v"])


class _Mapped:
    """One table file mapped into this process: numpy views of its header, keys, heads and records."""

    def __init__(self, path: Path, fd: int, size: int) -> None:
        self.path = path
        self._mmap = mmap.mmap(fd, size)
        self.header = np.ndarray((1,), HEADER, self._mmap, 0)
        slots, slot_bytes = int(self.header["slots"][0]), int(self.header["slot_bytes"][0])
        self.slots, self.slot_bytes = slots, slot_bytes
        offset = HEADER.itemsize
        self.keys = np.ndarray((slots,), np.int64, self._mmap, offset)
        offset += 8 * slots
        self.heads = np.ndarray((slots, HEAD_FIELDS), np.uint32, self._mmap, offset)
        offset += 4 * HEAD_FIELDS * slots
        self.records = np.ndarray((slots, slot_bytes), np.uint8, self._mmap, offset)

    @staticmethod
    def size(slots: int, slot_bytes: int) -> int:
        return HEADER.itemsize + slots * (8 + 4 * HEAD_FIELDS + slot_bytes)

    @property
    def retired(self) -> bool:
        return bool(self.header["retired"][0])

    def close(self) -> None:
        del self.header, self.keys, self.heads, self.records
        with contextlib.suppress(BufferError):
            self._mmap.close()


class OwnTable:
    """The table this process writes: every user it applies, as it stored them."""

    def __init__(self, path: Path, slots: int, slot_bytes: int) -> None:
        if slots < 1 or slot_bytes < 256:
            raise ConfigError(f"a user table needs at least 1 slot of 256 bytes, not {slots} of {slot_bytes}")
        self.capacity = int(slots * MAX_LOAD)
        size = _Mapped.size(slots, slot_bytes)
        room = os.statvfs(path.parent)
        existing = path.stat().st_size if path.exists() else 0
        if existing != size and room.f_bavail * room.f_frsize < size:
            # Pages are taken as users are written; a write past the file system's room would kill the process.
            raise OSError(f"{path.parent} has {room.f_bavail * room.f_frsize} bytes free, a user table of "
                          f"{slots} slots needs {size}")
        self._table = self._open(path, slots, slot_bytes, size)
        self._slot_of: dict[int, int] = {}
        self.clear()

    @staticmethod
    def _open(path: Path, slots: int, slot_bytes: int, size: int) -> _Mapped:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            existing = os.fstat(fd).st_size
            if existing == size:
                table = _Mapped(path, fd, size)
                if int(table.header["magic"][0]) == MAGIC and (table.slots, table.slot_bytes) == (slots, slot_bytes):
                    return table
                table.close()
            if existing:
                # Another geometry (or not a table): readers that mapped it must move to the new file.
                if existing >= HEADER.itemsize:
                    os.pwrite(fd, struct.pack("<Q", 1), HEADER.fields["retired"][1])
                os.close(fd)
                fd = -1
                path.unlink()
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            os.ftruncate(fd, size)
            os.pwrite(fd, struct.pack("<QQQQ", MAGIC, slots, slot_bytes, 0), 0)
            return _Mapped(path, fd, size)
        finally:
            if fd >= 0:
                os.close(fd)

    @property
    def path(self) -> Path:
        return self._table.path

    @property
    def users(self) -> int:
        return len(self._slot_of)

    def clear(self) -> None:
        """Empty the table in place: keys first, so no reader finds a slot while its head is reset."""
        table = self._table
        table.keys[:] = 0
        table.heads[:] = 0
        self._slot_of.clear()

    def publish(self, collection: str, version: str, states: Sequence[Applied], vectors: np.ndarray,
                has_vector: np.ndarray) -> dict[str, int]:
        """Write each of ``states`` (with its row of ``vectors`` where ``has_vector``) as stored just now
        in ``collection``, its vector in the space of model ``version``.

        Returns how many were not written, by reason (``full``, ``oversize``): those are passed on.
        """
        table = self._table
        refused = {"full": 0, "oversize": 0}
        for state, vector, has in zip(states, vectors, has_vector):
            record = encode(collection, version, state, vector if has else None)
            key = user_key(state.user_id)
            slot = self._slot_of.get(key)
            if len(record) > table.slot_bytes:
                refused["oversize"] += 1
                if slot is not None:  # an older, smaller state must not be read instead
                    self._empty(slot)
                continue
            if slot is None:
                slot = self._free_slot(key)
                if slot is None:
                    refused["full"] += 1
                    continue
            head = table.heads[slot]
            writing = (int(head[0]) + 1) | 1
            head[0] = writing  # odd: being written
            table.records[slot, :len(record)] = np.frombuffer(record, np.uint8)
            head[1] = len(record)
            head[2] = zlib.crc32(record)
            head[0] = writing + 1
            if key not in self._slot_of:
                table.keys[slot] = key  # published only once its record is whole
                self._slot_of[key] = slot
        return refused

    def _free_slot(self, key: int) -> int | None:
        table = self._table
        if len(self._slot_of) >= self.capacity:
            return None
        start = key % table.slots
        for probe in range(MAX_PROBES):
            slot = (start + probe) % table.slots
            if table.keys[slot] == 0:
                return slot
        return None

    def _empty(self, slot: int) -> None:
        """Make ``slot``'s record unreadable; the key keeps the slot (probes pass over it)."""
        head = self._table.heads[slot]
        head[0] = (int(head[0]) + 2) & ~1
        head[1] = 0

    def close(self) -> None:
        self._table.close()


class PeerTables:
    """The tables of the other processes, read-only, opened on first use."""

    def __init__(self, root: Path) -> None:
        self._root = root  # the data dir of the worker whose processes' tables these are
        self._tables: dict[int, _Mapped] = {}

    def _table(self, owner: int) -> _Mapped | None:
        table = self._tables.get(owner)
        if table is not None and not table.retired:
            return table
        if table is not None:
            table.close()
            del self._tables[owner]
        path = table_path(self._root, owner)
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            return None
        try:
            size = os.fstat(fd).st_size
            if size < HEADER.itemsize:
                return None
            mapped = _Mapped(path, fd, size)
        finally:
            os.close(fd)
        if int(mapped.header["magic"][0]) != MAGIC or mapped.retired \
                or _Mapped.size(mapped.slots, mapped.slot_bytes) != size:
            mapped.close()
            return None
        self._tables[owner] = mapped
        return mapped

    def read(self, owner: int, user_id: str) -> TableUser | None:
        """``user_id`` as process ``owner`` applied it last; None where its table does not hold it."""
        table = self._table(owner)
        if table is None:
            return None
        key = user_key(user_id)
        start = key % table.slots
        for probe in range(MAX_PROBES):
            slot = (start + probe) % table.slots
            found = int(table.keys[slot])
            if found == 0:
                return None
            if found == key:
                return self._read_slot(table, slot, user_id)
        return None

    @staticmethod
    def _read_slot(table: _Mapped, slot: int, user_id: str) -> TableUser | None:
        head = table.heads[slot]
        for _ in range(READ_ATTEMPTS):
            sequence, length, crc = int(head[0]), int(head[1]), int(head[2])
            if sequence % 2 or not 0 < length <= table.slot_bytes:
                if length == 0 and sequence % 2 == 0:
                    return None  # emptied: the owner could not keep this user here
                continue
            record = table.records[slot, :length].tobytes()
            if int(head[0]) != sequence or zlib.crc32(record) != crc:
                continue  # written meanwhile
            user = decode(record)
            return user if user.user_id == user_id else None
        return None

    def close(self) -> None:
        for table in self._tables.values():
            table.close()
        self._tables.clear()
