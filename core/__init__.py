"""scsnet's science core: ingest (NIfTI, DICOM, gradients, the upload rules), segmentation
run-time (ONNX Runtime), tensor fit (DIPY), measures, reports and the pipeline that strings
them together.

It imports no web or queue framework and nothing of the service, the gateway, the worker, the
command line or ``models`` (import-linter contracts in ``pyproject.toml``). This file stays
free of imports: the gateway imports the core's light modules (errors, upload rules, the
output table) without its scientific stack.
"""

__version__ = "0.2.0"
"""The version of scsnet, written once (``pyproject.toml`` reads it from here)."""
