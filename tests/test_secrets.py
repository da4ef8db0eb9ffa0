"""Webhook signing secrets are shown once and can be rotated with a grace period (the real
``scsnet`` command line as a subprocess, a real SQLite store): during the grace period a
webhook carries one ``v1`` per secret and verifies under either; after it, only the new one."""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import service_helpers as h
from sqlalchemy import update

from service import webhooks
from service.retention import purge_expired
from service.storage import Storage
from service.store import Store, Tenant, utcnow

SCSNET_BIN = Path(sys.executable).parent / "scsnet"
SECRET_LINE = "webhook signing secret"


def _run(data: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SCSNET_BIN), *args], env=h.env_for(data), capture_output=True, text=True, timeout=120, check=False)


def _secret(output: str) -> str:
    """The secret a command printed (on the line saying it is shown once)."""
    return next(line.split(": ", 1)[1] for line in output.splitlines() if SECRET_LINE in line and "(shown once" in line)


def _tenant(data: Path, name: str) -> Tenant:
    store = Store(f"sqlite:///{data / 'scsnet.db'}")
    with store.session() as s:
        found = s.query(Tenant).filter_by(name=name).one()
    return found


def test_the_webhook_secret_is_printed_only_when_the_tenant_is_created(tmp_path: Path) -> None:
    data = tmp_path / "var"
    first = _run(data, "apikey", "create", "--tenant", "north")
    assert first.returncode == 0 and "(new)" in first.stdout
    secret = _secret(first.stdout)
    assert secret.startswith("whsec_") and secret == _tenant(data, "north").webhook_secret
    second = _run(data, "apikey", "create", "--tenant", "north")
    assert second.returncode == 0 and second.stdout.strip().splitlines()[-1].startswith("scsnet_")
    assert secret not in second.stdout + second.stderr and "whsec_" not in second.stdout
    assert not any(line.startswith(SECRET_LINE) for line in second.stdout.splitlines())
    assert h.create_key(data, "north")[1] is None  # the helper the service tests use agrees

    made = _run(data, "tenant", "create", "south")
    assert made.returncode == 0 and _secret(made.stdout) == _tenant(data, "south").webhook_secret
    again = _run(data, "tenant", "create", "south")
    assert again.returncode == 2 and "whsec_" not in again.stdout + again.stderr
    listed = _run(data, "tenant", "list")
    assert listed.returncode == 0 and "whsec_" not in listed.stdout
    assert [line.split()[0] for line in listed.stdout.splitlines()] == ["north", "south"]
    assert "3 live keys" in listed.stdout.splitlines()[0] and "0 live keys" in listed.stdout.splitlines()[1]


def test_a_rotated_secret_signs_beside_the_new_one_until_its_grace_period_ends(tmp_path: Path) -> None:
    data = tmp_path / "var"
    old = _secret(_run(data, "tenant", "create", "north").stdout)
    rotated = _run(data, "tenant", "rotate-secret", "north", "--grace-hours", "2")
    assert rotated.returncode == 0, rotated.stderr
    new = _secret(rotated.stdout)
    assert new.startswith("whsec_") and new != old and old not in rotated.stdout
    assert "previous secret valid until" in _run(data, "tenant", "list").stdout

    tenant = _tenant(data, "north")
    assert tenant.signing_secrets() == [new, old]  # what the worker's deliver_webhook signs with
    body = webhooks.payload(job_id="j1", state="succeeded", artifacts={}, problem=None)
    header = webhooks.sign(tenant.signing_secrets(), body, timestamp=1_700_000_000)
    assert header.startswith("t=1700000000,v1=") and header.count(",v1=") == 2
    assert webhooks.verify(new, header, body, now=1_700_000_000)  # a receiver already switched
    assert webhooks.verify(old, header, body, now=1_700_000_000)  # one not yet switched
    assert not webhooks.verify("whsec_other", header, body, now=1_700_000_000)

    # the grace period ends: only the new secret signs, and the purge pass forgets the old one
    store = Store(f"sqlite:///{data / 'scsnet.db'}")
    with store.session() as s:
        s.execute(update(Tenant).where(Tenant.name == "north").values(previous_secret_expires_at=utcnow() - timedelta(seconds=1)))
    tenant = _tenant(data, "north")
    assert tenant.signing_secrets() == [new]
    header = webhooks.sign(tenant.signing_secrets(), body, timestamp=1_700_000_000)
    assert webhooks.verify(new, header, body, now=1_700_000_000) and not webhooks.verify(old, header, body, now=1_700_000_000)
    assert tenant.previous_webhook_secret == old  # still stored until the purge pass runs
    purge_expired(store, Storage(data), None)
    tenant = _tenant(data, "north")
    assert tenant.previous_webhook_secret is None and tenant.previous_secret_expires_at is None
    assert "previous secret" not in _run(data, "tenant", "list").stdout

    no_grace = _run(data, "tenant", "rotate-secret", "north", "--grace-hours", "0")
    assert no_grace.returncode == 0 and _tenant(data, "north").signing_secrets() == [_secret(no_grace.stdout)]
    assert _run(data, "tenant", "rotate-secret", "nobody").returncode == 2


def test_verify_reads_every_v1_and_refuses_malformed_headers() -> None:
    body = b'{"job_id":"j"}'
    header = webhooks.sign(["s-new", "s-old"], body, timestamp=1_000)
    assert webhooks.verify("s-old", header, body, now=1_000) and webhooks.verify("s-new", header, body, now=1_000)
    assert webhooks.verify("s-old", header.replace(",", ", "), body, now=1_000)  # spaces after commas
    assert not webhooks.verify("s-old", header, body, now=1_000 + webhooks.TOLERANCE_S + 1)  # too old
    for bad in ("", "t=1000", "v1=abc", "t=x,v1=abc", "t=1000,t=1000," + header.split(",", 1)[1], "t=1000,garbage"):
        assert not webhooks.verify("s-old", bad, body, now=1_000), bad
