"""A worker process's logging: library debug calls cost nothing at the level asked for."""
from __future__ import annotations

import logging
from collections.abc import Iterator

import faust
import pytest

from stream.worker import faust_worker


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    """The root logger, given back with its own level and handlers."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield root
    root.handlers[:] = handlers  # Faust's set-up clears them (pytest's capture among them)
    root.setLevel(level)


@pytest.mark.parametrize("loglevel, level", [("warning", logging.WARNING), ("error", logging.ERROR)])
def test_the_root_logger_stays_at_the_worker_log_level(root_logger: logging.Logger, loglevel: str,
                                                       level: int) -> None:
    worker = faust_worker(faust.App("streamrec-test-logging", broker="kafka://127.0.0.1:1"), loglevel)
    worker.redirect_stdouts = False  # keep pytest's capture; the level is set the same way
    worker._setup_logging()  # what the worker does first when it runs

    assert root_logger.level == level
    # aiokafka logs every frame it reads at DEBUG: at this level no record may be built for it.
    assert not logging.getLogger("aiokafka.conn").isEnabledFor(logging.DEBUG)
    assert not logging.getLogger("stream.recommend").isEnabledFor(logging.INFO)
