"""Service subcommands of ``scsnet``: ``serve``, ``worker``, ``apikey``, ``tenant``,
``destination``, ``db``, ``submit``.

Secrets are printed once: an API key when it is made, a tenant's webhook signing secret when the
tenant is made (``tenant create``, or the ``apikey create`` that creates it) or its secret
rotated (``tenant rotate-secret``); never again. A destination's headers (its credentials) are
stored and never printed back. Every command that opens the job store stops
with one line and status 2 if its schema is not this scsnet's (``scsnet db upgrade``).

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

COMMANDS: frozenset[str] = frozenset({"serve", "worker", "apikey", "tenant", "destination", "db", "submit"})
EXIT_STORE = 2
"""Exit status when the job store's schema is not this scsnet's."""


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register the service subcommands on the ``scsnet`` parser."""
    serve = sub.add_parser("serve", help="run the HTTP service (embedded Redis, gateway, an analysis and a deliveries worker)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    serve.add_argument(
        "--no-worker", action="store_true", help="gateway only (the analysis and deliveries workers run elsewhere: scsnet worker)"
    )
    serve.add_argument("--shutdown-timeout", type=float, default=30.0, help="seconds a running job may take to finish on stop")
    serve.add_argument(
        "--access-log", action="store_true", help="log every HTTP request (off by default: /metrics counts them by route and status)"
    )

    worker = sub.add_parser("worker", help="run a Celery worker for the service's analyses, deliveries, or both")
    worker.add_argument(
        "--queues",
        choices=("analyses", "deliveries", "all"),
        default="all",
        help="analyses; deliveries (webhooks and DICOMweb, in threads; loads no model); all (default: one process "
        "for both, fine for a small install; run analyses and deliveries apart so that a slow receiver never holds "
        "an analysis slot)",
    )
    worker.add_argument(
        "--concurrency", type=int, help="analyses (prefork processes) or deliveries (threads) at once (default 1; deliveries 4)"
    )
    worker.add_argument("--loglevel", default="INFO")

    apikey = sub.add_parser("apikey", help="create, revoke or list API keys")
    keys = apikey.add_subparsers(dest="apikey_command", required=True)
    create = keys.add_parser(
        "create",
        help="create a key for a tenant (and the tenant if new: only then is its webhook secret printed); prints the key last",
    )
    create.add_argument("--tenant", required=True, help="tenant name (a hospital, a research group)")
    revoke = keys.add_parser("revoke", help="revoke a key, given as its id or the key itself")
    revoke.add_argument("key")
    listing = keys.add_parser("list", help="list keys (ids only, never the keys)")
    listing.add_argument("--tenant")

    tenant = sub.add_parser("tenant", help="create or list tenants, rotate a tenant's webhook signing secret")
    tenants = tenant.add_subparsers(dest="tenant_command", required=True)
    tenant_create = tenants.add_parser("create", help="create a tenant; prints its webhook signing secret (shown once)")
    tenant_create.add_argument("name", help="tenant name (a hospital, a research group)")
    tenants.add_parser("list", help="list tenants (never their secrets)")
    rotate = tenants.add_parser(
        "rotate-secret", help="give a tenant a new webhook signing secret (printed once); the old one signs too for a grace period"
    )
    rotate.add_argument("name")
    rotate.add_argument(
        "--grace-hours",
        type=float,
        default=24.0,
        help="hours the old secret stays valid: webhooks carry a signature under each (default 24; 0: none)",
    )

    destination = sub.add_parser("destination", help="set, list or remove a tenant's DICOMweb destination (its PACS)")
    destinations = destination.add_subparsers(dest="destination_command", required=True)
    dest_set = destinations.add_parser(
        "set", help="store (or replace) the tenant's DICOMweb root; a DICOM job's SEG, SR and SC are sent there by STOW-RS"
    )
    dest_set.add_argument("--tenant", required=True)
    dest_set.add_argument("--url", required=True, help="DICOMweb root, e.g. https://pacs.example.org/dicom-web")
    dest_set.add_argument(
        "--header",
        action="append",
        default=[],
        metavar='"NAME: VALUE"',
        help="a header sent with every request, e.g. \"Authorization: Bearer ...\" (repeatable; stored, never printed back)",
    )
    destinations.add_parser("list", help="list destinations (URL and header names, never header values)")
    dest_remove = destinations.add_parser("remove", help="remove the tenant's destination")
    dest_remove.add_argument("--tenant", required=True)

    db = sub.add_parser("db", help="the job store's schema: show its revision, upgrade it")
    db_commands = db.add_subparsers(dest="db_command", required=True)
    db_commands.add_parser("current", help="print the schema revision of the job store and the one this scsnet needs")
    db_commands.add_parser("upgrade", help="migrate the job store to this scsnet's schema (back it up first)")

    submit = sub.add_parser("submit", help="send a study to a scsnet server, wait, download the outputs")
    submit.add_argument("inputs", nargs="+", type=Path, help="NIfTI, DICOM files or folders, or zips of DICOM")
    submit.add_argument("--server", help="base URL, e.g. http://127.0.0.1:8000 (default: $SCSNET_SERVER)")
    submit.add_argument(
        "--api-key",
        help="API key from scsnet apikey create; discouraged: other local users see command lines in ps, so "
        "set SCSNET_API_KEY instead (the default)",
    )
    submit.add_argument("--out", required=True, type=Path, help="folder for report.json and the other outputs")
    submit.add_argument("--bval", type=Path)
    submit.add_argument("--bvec", type=Path)
    submit.add_argument("--callback-url", help="URL the server POSTs to when the job ends")
    submit.add_argument("--idempotency-key", help="re-sending with the same key returns the same job")
    submit.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the job")


def run(args: argparse.Namespace) -> int:
    """Run one of :data:`COMMANDS`; returns the exit status."""
    from service.errors import SchemaOutdated

    commands = {
        "serve": _serve, "worker": _worker, "apikey": _apikey, "tenant": _tenant, "destination": _destination, "db": _db, "submit": _submit,
    }  # fmt: skip
    try:
        if args.command in ("serve", "worker"):
            _check_store()  # before a child process starts or Celery is exec'd
        return commands[args.command](args)
    except SchemaOutdated as exc:
        print(f"scsnet: error: {exc}", file=sys.stderr)
        return EXIT_STORE


def _check_store() -> None:
    """Open the job store once: an empty one gets its schema, an outdated one raises
    :class:`~service.errors.SchemaOutdated`."""
    from service.privacy import secure_service
    from service.settings import ServiceSettings
    from service.store import Store

    settings = ServiceSettings()
    secure_service(settings.data_root)  # the SQLite file may be created here: owner-only
    Store(settings.store_url).engine.dispose()


def _tenant(args: argparse.Namespace) -> int:
    from datetime import timedelta

    from service.privacy import secure_service
    from service.settings import ServiceSettings
    from service.store import Store

    settings = ServiceSettings()
    secure_service(settings.data_root)
    store = Store(settings.store_url)
    if args.tenant_command == "create":
        secret = store.create_tenant(args.name)
        if secret is None:
            print(f"scsnet: error: tenant {args.name} exists (rotate its secret: scsnet tenant rotate-secret {args.name})", file=sys.stderr)
            return 2
        print(f"tenant: {args.name} (new)")
        print(f"webhook signing secret of {args.name} (shown once, keep it secret): {secret}")
        return 0
    if args.tenant_command == "rotate-secret":
        if args.grace_hours < 0:
            print("scsnet: error: --grace-hours must be 0 or more", file=sys.stderr)
            return 2
        secret = store.rotate_webhook_secret(args.name, grace=timedelta(hours=args.grace_hours))
        if secret is None:
            print(f"scsnet: error: no tenant {args.name}", file=sys.stderr)
            return 2
        store.checkpoint()  # the replaced secret, if no grace, leaves no copy in the write-ahead log
        grace = f"keeps signing webhooks, as a second v1 signature, for {args.grace_hours:g} h" if args.grace_hours else "is no longer valid"
        print(f"webhook signing secret of {args.name} rotated; the previous one {grace}")
        print(f"new webhook signing secret of {args.name} (shown once, keep it secret): {secret}")
        return 0
    for name, created, live_keys, previous_until in store.list_tenants():
        rotation = f"  previous secret valid until {previous_until:%Y-%m-%d %H:%M} UTC" if previous_until else ""
        print(f"{name}  created {created:%Y-%m-%d %H:%M}  {live_keys} live key{'' if live_keys == 1 else 's'}{rotation}")
    return 0


def _destination(args: argparse.Namespace) -> int:
    from service.outbound import UnsafeDestination, check_destination
    from service.privacy import secure_service
    from service.settings import ServiceSettings
    from service.store import Store

    settings = ServiceSettings()
    secure_service(settings.data_root)  # owner-only: the store holds the destinations' credentials
    store = Store(settings.store_url)
    if args.destination_command == "set":
        headers: dict[str, str] = {}
        for header in args.header:
            name, sep, value = header.partition(":")
            if not sep or not name.strip() or any(c.isspace() for c in name.strip()) or "\n" in value or "\r" in value:
                print('scsnet: error: --header wants "Name: value"', file=sys.stderr)
                return 2
            headers[name.strip()] = value.strip()
        try:
            check_destination(args.url, allow_private=settings.allow_private_networks)
        except UnsafeDestination as exc:
            print(f"scsnet: error: {exc.detail}", file=sys.stderr)
            return 2
        if not store.set_destination(args.tenant, url=args.url, headers=headers):
            print(f"scsnet: error: no tenant {args.tenant}", file=sys.stderr)
            return 2
        store.checkpoint()  # replaced credentials leave no copy in the write-ahead log
        names = ", ".join(sorted(headers)) or "none"
        print(f"destination of {args.tenant}: {args.url} (headers: {names}; their values are not shown again)")
        return 0
    if args.destination_command == "remove":
        if not store.remove_destination(args.tenant):
            print(f"scsnet: error: tenant {args.tenant} has no destination", file=sys.stderr)
            return 2
        store.checkpoint()
        print(f"destination of {args.tenant} removed")
        return 0
    for tenant, url, names in store.destinations():
        print(f"{tenant}  {url}  headers: {', '.join(names) or 'none'}")
    return 0


def _db(args: argparse.Namespace) -> int:
    from service import migrations
    from service.privacy import secure_service
    from service.settings import ServiceSettings
    from service.store import engine_for

    settings = ServiceSettings()
    secure_service(settings.data_root)
    engine = engine_for(settings.store_url)
    try:
        if args.db_command == "current":
            print(f"job store schema: {migrations.describe(*migrations.current(engine))}; this scsnet needs {migrations.head()}")
            return 0
        before, after = migrations.upgrade(engine)
    finally:
        engine.dispose()
    print(f"job store schema upgraded from {before} to {after}" if before != after else f"job store schema already at {after}")
    return 0


def _apikey(args: argparse.Namespace) -> int:
    from service.privacy import secure_service
    from service.settings import ServiceSettings
    from service.store import Store

    settings = ServiceSettings()
    secure_service(settings.data_root)  # owner-only: the store holds the webhook secrets
    store = Store(settings.store_url)
    if args.apikey_command == "create":
        new = store.create_api_key(args.tenant)
        if new.webhook_secret is not None:  # the tenant is new: its secret, this once
            print(f"tenant: {new.tenant} (new)")
            print(f"webhook signing secret of {new.tenant} (shown once, keep it secret): {new.webhook_secret}")
        else:
            print(f"tenant: {new.tenant} (its webhook signing secret is not shown again; a new one: scsnet tenant rotate-secret {new.tenant})")
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
    from cli.embedded import DELIVERY_THREADS, worker_argv, worker_env
    from service.privacy import secure_service
    from service.settings import ServiceSettings

    settings = ServiceSettings()
    secure_service(settings.data_root)  # the umask survives the exec into Celery
    concurrency = args.concurrency or (DELIVERY_THREADS if args.queues == "deliveries" else 1)
    argv = worker_argv(queue_name=settings.queue_name, queues=args.queues, concurrency=concurrency, loglevel=args.loglevel)
    # become the Celery worker: its signals, its exit status
    os.execve(argv[0], argv, worker_env(os.environ, queues=args.queues))


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
    from app.server import uvicorn_config
    from app.settings import GatewaySettings
    from cli.embedded import start_delivery_worker, start_redis, start_worker
    from service.privacy import secure_service

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = GatewaySettings()
    data = secure_service(settings.data_root)  # owner-only, for this process and its children
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
            # deliveries apart: one tenant's slow receiver never delays another tenant's analysis
            children.append(
                start_delivery_worker(
                    queue_name=settings.queue_name, env=env, log_path=data / "logs" / "deliveries.log", shutdown_timeout_s=args.shutdown_timeout
                )
            )
        # timeouts, connection limit and trusted proxy from the settings (app.server)
        config = uvicorn_config(create_app(settings), settings, host=args.host, port=args.port, log_level="info", access_log=args.access_log)
        server = uvicorn.Server(config)
        threading.Thread(target=_watch, args=(children, server, failed), daemon=True).start()
        url = f"http://{args.host}:{args.port}"
        print(f"scsnet serving on {url} (data in {data}; worker log in {data / 'logs' / 'worker.log'})", flush=True)
        print(f"create an API key: SCSNET_DATA_DIR={data} scsnet apikey create --tenant NAME", flush=True)
        print(f"then: SCSNET_API_KEY=KEY scsnet submit STUDY --server {url} --out DIR   (Ctrl-C stops)", flush=True)
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

