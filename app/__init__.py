"""The HTTP gateway (FastAPI): receives studies, checks them early by the core's upload rules,
records jobs in the service's store and queues them by task name.

It imports the service layer and the core's light modules (errors, upload rules, the output
table), never the worker and nothing of the scientific stack (import-linter contracts in
``pyproject.toml``).
"""
