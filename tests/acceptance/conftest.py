"""Fixtures of the acceptance tier: each broker-dependent test runs on Redis and RabbitMQ."""

from __future__ import annotations

import pytest

from tests.acceptance import services
from tests.acceptance.cluster import BROKERS


@pytest.fixture(params=list(BROKERS))
def broker_url(request: pytest.FixtureRequest) -> str:
    """Redis (a flushed database of its own), then RabbitMQ (its queues reset)."""
    url = BROKERS[request.param]
    if request.param == "redis":
        request.getfixturevalue("redis_url")
    else:
        request.getfixturevalue("amqp_url")
        services.reset_rabbitmq_queues(url)
    return url
