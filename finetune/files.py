"""Files the fine-tuner keeps between cycles, written whole or not at all."""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def replace_whole(path: Path, write: Callable[[BinaryIO], None], *, scratch: str) -> None:
    """Write ``path`` through ``write`` into ``scratch`` beside it, sync it, then rename it over
    ``path``: a crash leaves the old file or the new one, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fresh = path.with_name(scratch)
    with fresh.open("wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(fresh, path)
