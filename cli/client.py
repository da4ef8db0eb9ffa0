"""The ``scsnet submit`` client: post a study, follow the job, download what it made.

The downloaded folder holds the same files ``scsnet analyze`` writes, each checked against the
server's ``Repr-Digest``; it is filled in a temporary sibling and renamed into place at the end.
"""

from __future__ import annotations

import base64
import contextlib
import shutil
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import httpx

from core.digest import sha256_of
from core.outputs import BY_KEY

Echo = Callable[[str], None]
EXIT_OK, EXIT_FAILED, EXIT_INPUT, EXIT_MODEL, EXIT_UNREACHABLE = 0, 1, 2, 3, 4

# the server names its form fields; the user of this client typed flags
_FIELD_TO_FLAG = (
    ("the bval and bvec fields", "--bval and --bvec"),
    ("the 'bval' field", "--bval"),
    ("the 'bvec' field", "--bvec"),
    ("the 'files' field", "the INPUT arguments"),
    ("send at most one bval and one bvec file", "give --bval and --bvec at most once each"),
    ("callback_url", "--callback-url"),
)


def in_client_terms(detail: str) -> str:
    """A server's problem detail with its form fields named as this client's flags."""
    for field_words, flag in _FIELD_TO_FLAG:
        detail = detail.replace(field_words, flag)
    return detail


class SubmitError(Exception):
    """The submission could not be completed; ``exit_code`` says how (CLI conventions)."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _problem_message(response: httpx.Response) -> SubmitError:
    try:
        problem = response.json()
        detail, status, slug = problem.get("detail", ""), int(problem.get("status", response.status_code)), problem.get("type", "")
    except ValueError:
        detail, status, slug = response.text[:200], response.status_code, ""
    code = EXIT_MODEL if slug.endswith("/model-unavailable") else EXIT_INPUT if 400 <= status < 500 else EXIT_FAILED
    return SubmitError(f"{status}: {in_client_terms(str(detail))}", code)


@contextlib.contextmanager
def _opened(inputs: Sequence[Path], bval: Path | None, bvec: Path | None) -> Iterator[list[tuple[str, tuple[str, IO[bytes]]]]]:
    """Multipart file fields for the inputs; a folder is sent as a zip made on the fly."""
    with contextlib.ExitStack() as stack:
        fields: list[tuple[str, tuple[str, IO[bytes]]]] = []
        for path in inputs:
            if path.is_dir():
                handle = stack.enter_context(tempfile.TemporaryFile(suffix=".zip"))
                with zipfile.ZipFile(handle, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
                    for file in sorted(p for p in path.rglob("*") if p.is_file() and not p.is_symlink()):
                        archive.write(file, file.relative_to(path).as_posix())
                handle.seek(0)
                fields.append(("files", (f"{path.name or 'study'}.zip", handle)))
            elif path.is_file():
                fields.append(("files", (path.name, stack.enter_context(open(path, "rb")))))
            else:
                raise SubmitError(f"{path} does not exist", EXIT_INPUT)
        for name, extra in (("bval", bval), ("bvec", bvec)):
            if extra is not None:
                fields.append((name, (extra.name, stack.enter_context(open(extra, "rb")))))
        yield fields


def _download(client: httpx.Client, url: str, dest: Path) -> None:
    with client.stream("GET", url) as response:
        if response.status_code != 200:
            response.read()
            raise _problem_message(response)
        with open(dest, "wb") as sink:
            sink.writelines(response.iter_bytes())
        expected = response.headers.get("repr-digest", "")
    if expected.startswith("sha-256=:"):
        want = base64.b64decode(expected.removeprefix("sha-256=:").rstrip(":")).hex()
        if sha256_of(dest) != want:
            raise SubmitError(f"{dest.name} arrived corrupted (digest mismatch); submit again")


def _place(staging: Path, out: Path) -> None:
    """Move the downloaded folder to ``out``, replacing an earlier result only."""
    if out.exists():
        if not (out / "report.json").exists() and any(out.iterdir()):
            raise SubmitError(f"the output folder {out} exists and holds other files; choose an empty or new folder", EXIT_INPUT)
        shutil.rmtree(out)
    staging.rename(out)


def _wait(client: httpx.Client, location: str, *, echo: Echo, poll_s: float | None, timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    job: dict[str, Any] = {}
    tag, shown = "", ""
    while time.monotonic() < deadline:
        response = client.get(location, headers={"If-None-Match": tag} if tag else {})
        if response.status_code == 200:
            job, tag = response.json(), response.headers.get("etag", "")
        elif response.status_code != 304:
            raise _problem_message(response)
        if job.get("state") in ("succeeded", "failed", "cancelled"):
            return job
        line = _status_line(job)
        if line != shown:
            echo(line)
            shown = line
        time.sleep(poll_s if poll_s is not None else float(response.headers.get("retry-after", "2")))
    raise SubmitError(f"the job did not finish within {timeout_s:g} s; follow it at {location}")


def _status_line(job: dict[str, Any]) -> str:
    if job.get("state") == "queued":
        return f"queued (position {job.get('queue_position')})"
    return f"{job.get('state')}: {job.get('stage') or 'starting'} {100 * float(job.get('progress') or 0):.0f}%"


def submit(
    inputs: Sequence[Path],
    *,
    server: str,
    api_key: str,
    out: Path,
    bval: Path | None = None,
    bvec: Path | None = None,
    callback_url: str | None = None,
    idempotency_key: str | None = None,
    echo: Echo = lambda _: None,
    poll_s: float | None = None,
    timeout_s: float = 3600.0,
    http_timeout_s: float = 60.0,
) -> dict[str, Any]:
    """Submit a study, wait for its job and download its outputs into ``out``; returns the job.

    Raises :class:`SubmitError` when the study is refused, the job fails or is cancelled, or
    the server cannot be reached (``EXIT_UNREACHABLE``).
    """
    try:
        return _submit(
            inputs, server=server, api_key=api_key, out=out, bval=bval, bvec=bvec, callback_url=callback_url,
            idempotency_key=idempotency_key, echo=echo, poll_s=poll_s, timeout_s=timeout_s, http_timeout_s=http_timeout_s,
        )  # fmt: skip
    except httpx.TimeoutException as exc:
        raise SubmitError(f"the server at {server} did not answer in time ({type(exc).__name__}); try again later", EXIT_UNREACHABLE) from exc
    except httpx.TransportError as exc:  # refused, reset, unknown host
        raise SubmitError(f"cannot reach the server at {server}: {exc or type(exc).__name__}", EXIT_UNREACHABLE) from exc
    except httpx.InvalidURL as exc:
        raise SubmitError(f"the server address {server!r} is not a URL like http://host:8000", EXIT_INPUT) from exc


def _submit(
    inputs: Sequence[Path],
    *,
    server: str,
    api_key: str,
    out: Path,
    bval: Path | None,
    bvec: Path | None,
    callback_url: str | None,
    idempotency_key: str | None,
    echo: Echo,
    poll_s: float | None,
    timeout_s: float,
    http_timeout_s: float,
) -> dict[str, Any]:
    if not server.startswith(("http://", "https://")):
        raise SubmitError(f"the server address {server!r} is not a URL like http://host:8000", EXIT_INPUT)
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
    timeout = httpx.Timeout(http_timeout_s, connect=min(10.0, http_timeout_s))
    with httpx.Client(base_url=server.rstrip("/"), headers={"Authorization": f"Bearer {api_key}"}, timeout=timeout) as client:
        with _opened(inputs, bval, bvec) as files:
            data = {"callback_url": callback_url} if callback_url else None
            response = client.post("/v1/jobs", files=files, data=data, headers=headers)
        if response.status_code != 202:
            raise _problem_message(response)
        location = response.headers["location"]
        echo(f"submitted: job {response.json()['id']}")
        job = _wait(client, location, echo=echo, poll_s=poll_s, timeout_s=timeout_s)
        if job["state"] == "failed":
            problem = job.get("problem") or {}
            slug = str(problem.get("type", ""))
            code = EXIT_MODEL if slug.endswith("/model-unavailable") else EXIT_INPUT if int(problem.get("status", 500)) < 500 else EXIT_FAILED
            raise SubmitError(f"the job failed: {in_client_terms(str(problem.get('detail', 'no detail')))}", code)
        if job["state"] == "cancelled":
            raise SubmitError("the job was cancelled")
        out = out.absolute()
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
        try:
            for key, url in job["links"].items():
                if key in BY_KEY:
                    _download(client, url, staging / BY_KEY[key].filename)
            _place(staging, out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return job
