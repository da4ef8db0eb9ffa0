"""The ``scsnet`` command line: ``analyze`` and ``convert`` on local files (the science core),
and the service commands (``serve``, ``worker``, ``apikey``, ``submit``).

Each command imports only what its path uses, so ``scsnet analyze`` loads no web or queue
framework.
"""
