"""The scsnet service: the HTTP gateway and the light modules it shares with the worker.

Nothing here imports the science core's heavy dependencies; ``tests/test_service_layering.py``
keeps it that way.
"""
