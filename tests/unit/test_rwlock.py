"""The readers-writer lock: readers share, a writer is alone, a waiting writer is not starved."""
from __future__ import annotations

import threading
import time

from stream.rwlock import ReadWriteLock


def test_readers_share_the_lock() -> None:
    lock = ReadWriteLock()
    inside = threading.Barrier(3, timeout=10)

    def read() -> None:
        with lock.reading():
            inside.wait()  # all three readers are inside at once, or this times out

    threads = [threading.Thread(target=read) for _ in range(2)]
    for thread in threads:
        thread.start()
    read()
    for thread in threads:
        thread.join()


def test_a_writer_waits_for_readers_and_excludes_them() -> None:
    lock = ReadWriteLock()
    events: list[str] = []
    reader_in, release_reader = threading.Event(), threading.Event()

    def reader() -> None:
        with lock.reading():
            reader_in.set()
            release_reader.wait(10)
            events.append("reader out")

    def writer() -> None:
        with lock.writing():
            events.append("writer in")
            time.sleep(0.05)
            events.append("writer out")

    def late_reader() -> None:
        with lock.reading():
            events.append("late reader in")

    first = threading.Thread(target=reader)
    first.start()
    assert reader_in.wait(10)
    write = threading.Thread(target=writer)
    write.start()
    time.sleep(0.05)  # the writer is now waiting for the first reader
    late = threading.Thread(target=late_reader)
    late.start()
    time.sleep(0.05)
    assert events == []  # neither the writer nor the late reader got past the first reader
    release_reader.set()
    for thread in (first, write, late):
        thread.join(10)
    # The waiting writer went before the reader that came after it, and alone.
    assert events == ["reader out", "writer in", "writer out", "late reader in"]


def test_an_exception_releases_the_lock() -> None:
    lock = ReadWriteLock()
    for section in (lock.reading, lock.writing):
        try:
            with section():
                raise RuntimeError("inside")
        except RuntimeError:
            pass
    with lock.writing():
        pass
    with lock.reading():
        pass
