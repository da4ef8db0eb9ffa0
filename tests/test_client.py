"""``scsnet submit`` as a user meets it: configured from the environment, refusals told in its
own flags, an unreachable server told in one line with its own exit status; against a real
``scsnet serve`` (embedded Redis, Celery worker, tiny decoder model), a closed port and a
server that never answers."""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import service_helpers as h

from cli.client import EXIT_INPUT, EXIT_UNREACHABLE, SubmitError, submit
from core.settings import SHIPPED_MODEL_DIR

REAL = Path(__file__).parent / "data" / "sct_tutorial_dmri"
PUBLIC_URL = "https://scsnet.example.org/gw"


@pytest.fixture(scope="module")
def served() -> Iterator[h.Served]:
    data = h.short_tmpdir("scsc") / "var"
    server = h.start_serve(data, model_dir=SHIPPED_MODEL_DIR, extra_env={"SCSNET_PUBLIC_URL": PUBLIC_URL})
    yield server
    assert server.stop() == 0, server.log_path.read_text()[-3000:]


@pytest.fixture(scope="module")
def key(served: h.Served) -> tuple[str, str]:
    return h.create_key(served.data_dir, "north")


def _scsnet(*args: str, env: dict[str, str], timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*h.SCSNET, *args], capture_output=True, text=True, timeout=timeout_s, check=False, env=env)


def test_submit_takes_server_and_key_from_the_environment(served: h.Served, key: tuple[str, str], tmp_path: Path) -> None:
    receiver = h.start_webhook_receiver()
    try:
        env = h.env_for(served.data_dir, SCSNET_SERVER=served.url, SCSNET_API_KEY=key[0])
        out = tmp_path / "result"
        done = _scsnet(
            "submit", str(REAL / "dmri.nii.gz"), "--bval", str(REAL / "bvals.txt"), "--bvec", str(REAL / "bvecs.txt"),
            "--out", str(out), "--callback-url", receiver.url, env=env,
        )  # fmt: skip
        # configured from the environment alone, the client reached the server and followed the
        # job to its end
        assert "submitted: job" in done.stderr, done.stderr
        assert done.returncode == 0, done.stderr
        assert (out / "report.json").exists()
        # the webhook of that job carries links made absolute with SCSNET_PUBLIC_URL
        h.wait_until(lambda: receiver.received, timeout_s=30, what="the webhook")
        payload = json.loads(receiver.received[-1][1])
        assert payload["links"]["self"] == f"{PUBLIC_URL}/v1/jobs/{payload['job_id']}"
        assert all(link.startswith(PUBLIC_URL + "/v1/jobs/") for link in payload["links"].values())
        if payload["state"] == "succeeded":
            assert payload["links"]["report"] == f"{PUBLIC_URL}/v1/jobs/{payload['job_id']}/report"
    finally:
        receiver.stop()


def test_a_missing_server_or_key_is_one_line_and_exit_2(served: h.Served, tmp_path: Path) -> None:
    env = h.env_for(served.data_dir)  # no SCSNET_SERVER, no SCSNET_API_KEY
    for args, missing in (
        ((), ("--server", "--api-key")),
        (("--server", served.url), ("--api-key",)),
        (("--api-key", "scsnet_x_y"), ("--server",)),
    ):
        done = _scsnet("submit", str(REAL / "dmri.nii.gz"), "--out", str(tmp_path / "o"), *args, env=env)
        assert done.returncode == EXIT_INPUT, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
        assert all(flag in done.stderr for flag in missing), done.stderr
    assert not (tmp_path / "o").exists()


def test_refusals_name_the_clients_own_flags(served: h.Served, key: tuple[str, str], tmp_path: Path) -> None:
    env = h.env_for(served.data_dir, SCSNET_SERVER=served.url, SCSNET_API_KEY=key[0])
    done = _scsnet("submit", str(REAL / "dmri.nii.gz"), "--out", str(tmp_path / "o"), env=env)
    assert done.returncode == EXIT_INPUT, done.stderr
    assert "--bval and --bvec" in done.stderr and "field" not in done.stderr
    bad_hook = _scsnet(
        "submit", str(REAL / "dmri.nii.gz"), "--bval", str(REAL / "bvals.txt"), "--bvec", str(REAL / "bvecs.txt"),
        "--out", str(tmp_path / "o"), "--callback-url", "http://[::1", env=env,
    )  # fmt: skip
    assert bad_hook.returncode == EXIT_INPUT and "--callback-url" in bad_hook.stderr, bad_hook.stderr


def test_a_refused_connection_is_one_line_and_exit_4(tmp_path: Path) -> None:
    closed = f"http://127.0.0.1:{h.free_port()}"  # nothing listens there
    env = h.env_for(tmp_path / "var", SCSNET_SERVER=closed, SCSNET_API_KEY="scsnet_x_y")
    done = _scsnet("submit", str(REAL / "dmri.nii.gz"), "--out", str(tmp_path / "o"), env=env, timeout_s=60)
    assert done.returncode == EXIT_UNREACHABLE == 4, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot reach the server" in lines[0] and closed in lines[0]
    assert "internal error" not in done.stderr


def test_a_server_that_never_answers_times_out_with_exit_4(tmp_path: Path) -> None:
    with socket.socket() as silent:  # accepts connections (the kernel's backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with pytest.raises(SubmitError) as caught:
            submit([REAL / "bvals.txt"], server=url, api_key="scsnet_x_y", out=tmp_path / "o", http_timeout_s=1.0)
    assert caught.value.exit_code == EXIT_UNREACHABLE
    assert "did not answer in time" in str(caught.value)


def test_a_server_address_that_is_no_url_is_exit_2(tmp_path: Path) -> None:
    with pytest.raises(SubmitError) as caught:
        submit([REAL / "bvals.txt"], server="127.0.0.1:8000", api_key="scsnet_x_y", out=tmp_path / "o")
    assert caught.value.exit_code == EXIT_INPUT and "http://host:8000" in str(caught.value)
