"""The worker entry point: ``streamrec worker``."""
from __future__ import annotations

import asyncio
import logging

from core.settings import Settings
from stream.broker import ensure_topics, wait_for_broker

log = logging.getLogger(__name__)


def run_worker(settings: Settings, *, loglevel: str = "info") -> None:
    import faust

    from stream.app import create_app
    from stream.services import Services
    from stream.swap import reconcile

    asyncio.run(wait_for_broker(settings.bootstrap_servers, 60,
                                client_options=settings.kafka_client_options()))
    asyncio.run(ensure_topics(settings))
    services = Services.open(settings)
    reconcile(services)  # stored vectors of a version promoted while this worker was down
    app = create_app(settings, services)
    worker = faust.Worker(app, loglevel=loglevel, quiet=True)
    try:
        worker.execute_from_commandline()
    finally:
        services.close()
