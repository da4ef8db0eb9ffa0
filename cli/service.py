"""Service subcommands of ``scsnet``: ``serve``, ``worker``, ``apikey``, ``submit``.

Imports stay inside :func:`run` so ``scsnet analyze`` never loads the web or queue stack.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import uvicorn

    from cli.embedded import Child

COMMANDS: frozenset[str] = frozenset({"serve", "worker", "apikey", "submit"})


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register the service subcommands on the ``scsnet`` parser."""
    serve = sub.add_parser("serve", help="run the HTTP service (embedded Redis, gateway and one worker)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    serve.add_argument("--no-worker", action="store_true", help="gateway only (workers run elsewhere: scsnet worker)")
    serve.add_argument("--shutdown-timeout", type=float, default=30.0, help="seconds a running job may take to finish on stop")
    serve.add_argument(
        "--access-log", action="store_true", help="log every HTTP request (off by default: /metrics counts them by route and status)"
    )

    worker = sub.add_parser("worker", help="run a Celery worker for the service's analysis queue")
    worker.add_argument("--concurrency", type=int, default=1, help="analyses run at once (default 1)")
    worker.add_argument("--loglevel", default="INFO")

    apikey = sub.add_parser("apikey", help="create, revoke or list API keys")
    keys = apikey.add_subparsers(dest="apikey_command", required=True)
    create = keys.add_parser("create", help="create a key for a tenant (and the tenant if new); prints the key last")
    create.add_argument("--tenant", required=True, help="tenant name (a hospital, a research group)")
    revoke = keys.add_parser("revoke", help="revoke a key, given as its id or the key itself")
    revoke.add_argument("key")
    listing = keys.add_parser("list", help="list keys (ids only, never the keys)")
    listing.add_argument("--tenant")

    submit = sub.add_parser("submit", help="send a study to a scsnet server, wait, download the outputs")
    submit.add_argument("inputs", nargs="+", type=Path, help="NIfTI, DICOM files or folders, or zips of DICOM")
    submit.add_argument("--server", help="base URL, e.g. http://127.0.0.1:8000 (default: $SCSNET_SERVER)")
    submit.add_argument("--api-key", help="API key from scsnet apikey create (default: $SCSNET_API_KEY)")
    submit.add_argument("--out", required=True, type=Path, help="folder for report.json and the other outputs")
    submit.add_argument("--bval", type=Path)
    submit.add_argument("--bvec", type=Path)
    submit.add_argument("--callback-url", help="URL the server POSTs to when the job ends")
    submit.add_argument("--idempotency-key", help="re-sending with the same key returns the same job")
    submit.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the job")


def run(args: argparse.Namespace) -> int:
    """Run one of :data:`COMMANDS`; returns the exit status."""
    command = {"serve": _serve, "worker": _worker, "apikey": _apikey, "submit": _submit}[args.command]
    return command(args)


def _apikey(args: argparse.Namespace) -> int:
    from service.settings import ServiceSettings
    from service.store import Store

    settings = ServiceSettings()
    settings.data_root.mkdir(parents=True, exist_ok=True)
    store = Store(settings.store_url)
    if args.apikey_command == "create":
        new = store.create_api_key(args.tenant)
        print(f"tenant: {new.tenant}{' (new)' if new.tenant_created else ''}")
        print(f"webhook signing secret of {new.tenant}: {new.webhook_secret}")
        print(f"key id: {new.key_id} (revoke with: scsnet apikey revoke {new.key_id})")
        print("API key (shown once, keep it secret):")
        print(new.key)
        return 0
    if args.apikey_command == "revoke":
        if not store.revoke_api_key(args.key):
            print("scsnet: error: no such live key", file=sys.stderr)
            return 2
        print("revoked")
        return 0
    for key_id, tenant, created, revoked in store.list_api_keys(args.tenant):
        state = f"revoked {revoked:%Y-%m-%d %H:%M}" if revoked else "live"
        print(f"{key_id}  {tenant}  created {created:%Y-%m-%d %H:%M}  {state}")
    return 0


def _worker(args: argparse.Namespace) -> int:
    from cli.embedded import worker_argv
    from service.settings import ServiceSettings

    argv = worker_argv(queue_name=ServiceSettings().queue_name, concurrency=args.concurrency, loglevel=args.loglevel)
    os.execv(argv[0], argv)  # become the Celery worker: its signals, its exit status


def _submit(args: argparse.Namespace) -> int:
    from cli.client import EXIT_INPUT, SubmitError, submit

    # the client's own configuration: flags first, then the environment (no settings class:
    # these are the client's, not a service process's)
    server = args.server or os.environ.get("SCSNET_SERVER", "")
    api_key = args.api_key or os.environ.get("SCSNET_API_KEY", "")
    missing = [flag for flag, value in (("--server (or SCSNET_SERVER)", server), ("--api-key (or SCSNET_API_KEY)", api_key)) if not value]
    if missing:
        print(f"scsnet: error: submit needs {' and '.join(missing)}", file=sys.stderr)
        return EXIT_INPUT
    try:
        submit(
            args.inputs,
            server=server,
            api_key=api_key,
            out=args.out,
            bval=args.bval,
            bvec=args.bvec,
            callback_url=args.callback_url,
            idempotency_key=args.idempotency_key,
            echo=lambda line: print(line, file=sys.stderr, flush=True),
            timeout_s=args.timeout,
        )
    except SubmitError as exc:
        print(f"scsnet: error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(f"outputs in {args.out} (report.json, labels.nii.gz, qc.png, ...)")
    return 0


class _Stop(Exception):
    """SIGTERM arrived."""


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop


def _serve(args: argparse.Namespace) -> int:
    import logging

    import uvicorn

    from app.main import create_app
    from app.settings import GatewaySettings
    from cli.embedded import start_redis, start_worker

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = GatewaySettings()
    data = settings.data_root
    data.mkdir(parents=True, exist_ok=True)
    # the worker inherits this process's configuration, with the data dir made absolute
    env = {**os.environ, "SCSNET_DATA_DIR": str(data)}
    children: list[Child] = []
    signal.signal(signal.SIGTERM, _raise_stop)
    server: uvicorn.Server | None = None
    failed: list[str] = []
    try:
        if settings.redis_url is None:
            children.append(start_redis(settings.embedded_redis_socket))
        if not args.no_worker:
            children.append(
                start_worker(queue_name=settings.queue_name, env=env, log_path=data / "logs" / "worker.log", shutdown_timeout_s=args.shutdown_timeout)
            )
        # uvicorn picks httptools and uvloop (dependencies) over h11 and asyncio by itself
        config = uvicorn.Config(create_app(settings), host=args.host, port=args.port, log_level="info", access_log=args.access_log)
        server = uvicorn.Server(config)
        threading.Thread(target=_watch, args=(children, server, failed), daemon=True).start()
        url = f"http://{args.host}:{args.port}"
        print(f"scsnet serving on {url} (data in {data}; worker log in {data / 'logs' / 'worker.log'})", flush=True)
        print(f"create an API key: SCSNET_DATA_DIR={data} scsnet apikey create --tenant NAME", flush=True)
        print(f"then: scsnet submit STUDY --server {url} --api-key KEY --out DIR   (or set SCSNET_SERVER, SCSNET_API_KEY; Ctrl-C stops)", flush=True)
        server.run()
    except (KeyboardInterrupt, _Stop):
        pass
    except SystemExit:  # uvicorn exits when it cannot bind the address
        failed.append("the gateway (is the port in use?)")
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for child in reversed(children):
            child.stop()
        print("scsnet stopped", flush=True)
    if failed:
        print(f"scsnet: error: {', '.join(failed)} exited unexpectedly", file=sys.stderr)
        return 1
    return 0 if server is not None and server.started else 1


def _watch(children: list[Child], server: uvicorn.Server, failed: list[str]) -> None:
    """Stop the gateway if a child process dies on its own."""
    while not server.should_exit:
        for child in children:
            if not child.alive():
                failed.append(child.name)
                server.should_exit = True
                return
        time.sleep(0.5)

