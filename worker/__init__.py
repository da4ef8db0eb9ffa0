"""The Celery worker: a thin adapter that takes analysis and webhook jobs off the queue, runs the
science core's pipeline and records the outcome through the service layer.

``celery -A worker.celery_app worker`` (or ``scsnet worker``). The gateway never imports this
package: it sends tasks by name (:mod:`service.queue`).
"""
