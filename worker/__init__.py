"""scsnet worker: the science core (ingest, tensor, segmentation, measures, reports) and the
Celery adapter around it.

The subpackages ``ingest``, ``tensor``, ``segment``, ``measures`` and ``report`` import no web
or queue framework; they are shared by the ``scsnet`` command line and the Celery task.
"""

__version__ = "0.1.0"
