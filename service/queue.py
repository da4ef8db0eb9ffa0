"""The gateway's side of the task queue: send tasks by name, look into the broker.

The gateway never imports ``worker.tasks`` (nor anything heavy): it sends ``scsnet.analyze`` with
a job id and a dispatch token, never file contents. The same names and queues are used by
``worker.celery_app``: analyses go through ``queue_name``, webhook and DICOMweb deliveries through
their own queue (:func:`deliveries_queue`), served by its own worker, so that one tenant's slow
receiver never delays another tenant's analysis.
"""

from __future__ import annotations

import json
import uuid
from typing import Protocol

import redis
from celery import Celery

ANALYZE_TASK = "scsnet.analyze"
WEBHOOK_TASK = "scsnet.deliver_webhook"
DICOMWEB_TASK = "scsnet.deliver_dicomweb"
UNACKED_KEY = "unacked"  # kombu's Redis transport keeps delivered, unacknowledged messages here


def deliveries_queue(queue_name: str) -> str:
    """The broker queue of the delivery tasks that go with the analysis queue ``queue_name``."""
    return f"{queue_name}-deliveries"


def redis_py_url(broker_url: str) -> str:
    """The redis-py spelling of a kombu broker URL (``redis+socket://`` -> ``unix://``)."""
    if broker_url.startswith("redis+socket://"):
        return "unix://" + broker_url.removeprefix("redis+socket://")
    return broker_url


class JobQueue(Protocol):
    """What the gateway needs from the broker."""

    def send_analysis(self, job_id: str, token: str) -> None: ...

    def send_webhook(self, job_id: str) -> None: ...

    def send_delivery(self, job_id: str, run: str) -> None: ...

    def depth(self) -> int: ...

    def ping(self) -> None: ...

    def job_ids_in_broker(self) -> set[str]: ...


class CeleryQueue:
    """:class:`JobQueue` over Celery and Redis."""

    def __init__(self, broker_url: str, *, queue_name: str) -> None:
        self.queue_name = queue_name
        self._celery = Celery("scsnet-gateway", broker=broker_url, set_as_current=False)
        self._celery.conf.update(
            task_default_queue=queue_name,
            # A sender that cannot reach the broker should fail fast; the job stays queued in
            # the store and the re-enqueue loop sends it later.
            broker_connection_timeout=3,
            broker_transport_options={"max_retries": 1},
        )
        self._redis = redis.Redis.from_url(redis_py_url(broker_url), socket_timeout=3, socket_connect_timeout=3)

    def send_analysis(self, job_id: str, token: str) -> None:
        """Enqueue the analysis of ``job_id``; the Celery task id is the job id."""
        self._celery.send_task(ANALYZE_TASK, args=[job_id, token], task_id=job_id, queue=self.queue_name)

    def send_webhook(self, job_id: str) -> None:
        """Enqueue the webhook delivery for ``job_id``'s terminal state."""
        self._celery.send_task(WEBHOOK_TASK, args=[job_id], task_id=uuid.uuid4().hex, queue=deliveries_queue(self.queue_name))

    def send_delivery(self, job_id: str, run: str) -> None:
        """Enqueue storing ``job_id``'s DICOM results in its tenant's DICOMweb destination
        (``run``: the delivery run the store started, :meth:`service.store.Store.start_delivery`)."""
        self._celery.send_task(DICOMWEB_TASK, args=[job_id, run], task_id=uuid.uuid4().hex, queue=deliveries_queue(self.queue_name))

    def depth(self) -> int:
        """Messages waiting in the queue."""
        return int(self._redis.llen(self.queue_name))  # type: ignore[arg-type]

    def ping(self) -> None:
        """Raise if the broker cannot be reached."""
        self._redis.ping()

    def job_ids_in_broker(self) -> set[str]:
        """Task ids of messages waiting in the queue or delivered but not yet acknowledged."""
        ids: set[str] = set()
        for raw in self._redis.lrange(self.queue_name, 0, -1):  # type: ignore[union-attr]
            ids.add(_task_id(raw))
        for raw in self._redis.hvals(UNACKED_KEY):  # type: ignore[union-attr]
            message = json.loads(raw)
            ids.add(message[0].get("headers", {}).get("id", "") if isinstance(message, list) else "")
        return ids

    def close(self) -> None:
        """Release broker connections."""
        self._redis.close()
        self._celery.close()


def _task_id(raw: bytes | str) -> str:
    try:
        return str(json.loads(raw).get("headers", {}).get("id", ""))
    except (ValueError, AttributeError):
        return ""
