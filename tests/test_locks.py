"""The lock files (requirements/*.lock, made by `bash .ci/lock`) against pyproject.toml, the known
advisories and the interpreter running the tests: every pin exact and hashed, every requirement of
pyproject pinned within its specifier, each lock closed under its packages' own requirements, no
pin below an advisory's fixed release, and .venv holding exactly the locked versions (so CI proves
it installed from the lock, as .ci/venv does)."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import NormalizedName, canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCKS = ROOT / "requirements"
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
EXTRAS = PROJECT["optional-dependencies"]
REFRESH = "pyproject.toml and the locks disagree: refresh them with `bash .ci/lock`"

# The platform the locks are for (.ci/lock: CPython 3.11 on Linux x86_64; 3.11.0 as uv assumes).
TARGET = {
    "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
    "implementation_name": "cpython", "platform_python_implementation": "CPython",
    "python_version": "3.11", "python_full_version": "3.11.0",
}  # fmt: skip


def _gpu_requirement() -> str:
    # the worker image's CUDA build of ONNX Runtime, bounded as pyproject bounds the CPU build
    (ort,) = [Requirement(r) for r in PROJECT["dependencies"] if Requirement(r).name == "onnxruntime"]
    return f"onnxruntime-gpu{ort.specifier},<2"


# Each lock and the pyproject.toml requirements it locks.
LOCKED = {
    "service.lock": PROJECT["dependencies"],
    "gateway.lock": EXTRAS["gateway"] + EXTRAS["postgres"],
    "postgres.lock": EXTRAS["postgres"],
    "onnxruntime-gpu.lock": [_gpu_requirement()],
}

# No lock (and no installed test tool) may hold a release older than the first one fixing a
# published advisory: package -> that release. The ids are in the comments; the list was made
# from the advisories known when the locks were introduced (GitHub/OSV), and grows with them.
ADVISORY_FLOORS = {
    # CVE-2024-24762 (0.0.7), CVE-2024-53981 (0.0.18), CVE-2026-24486 (0.0.22), CVE-2026-40347
    # (0.0.26), CVE-2026-42561 (0.0.27), CVE-2026-53538 and CVE-2026-53539 (0.0.30),
    # CVE-2026-53540 / GHSA-v9pg-7xvm-68hf (0.0.31)
    "python-multipart": "0.0.31",
    # CVE-2024-47874 (0.40.0), CVE-2025-54121 (0.47.2), CVE-2025-62727 (0.49.1), CVE-2026-48710
    # (1.0.1), CVE-2026-54282 (1.3.0), CVE-2026-54283 / GHSA-82w8-qh3p-5jfq (1.3.1)
    "starlette": "1.3.1",
    "fastapi": "0.109.1",  # CVE-2021-32677 (0.65.2), CVE-2024-24762 (0.109.1)
    "h11": "0.16.0",  # CVE-2025-43859
    "uvicorn": "0.11.7",  # CVE-2020-7694, CVE-2020-7695
    "httpx": "0.23.0",  # CVE-2021-41945
    "pydantic": "2.4.0",  # CVE-2024-3772
    "celery": "5.2.2",  # CVE-2021-23727
    "redis": "4.5.4",  # CVE-2023-28858, CVE-2023-28859
    # CVE-2024-28219 (10.3.0), CVE-2025-48379 (11.3.0), CVE-2026-25990 (12.1.1),
    # BIT-pillow-2026-59199 and BIT-pillow-2026-59205 (12.3.0)
    "pillow": "12.3.0",
    "protobuf": "6.33.5",  # CVE-2024-7254, CVE-2025-4565 (6.31.1), CVE-2026-0994 (6.33.5)
    "pygments": "2.20.0",  # CVE-2022-40896 (2.15.0), CVE-2026-4539 (2.20.0)
    "idna": "3.7",  # CVE-2024-3651
    "certifi": "2024.7.4",  # CVE-2024-39689
    "setuptools": "78.1.1",  # CVE-2024-6345 (70.0.0), CVE-2025-47273 (78.1.1)
    "tqdm": "4.66.3",  # CVE-2024-34062
    "mako": "1.2.2",  # CVE-2022-40023
    "markdown-it-py": "2.2.0",  # CVE-2023-26302, CVE-2023-26303
    "deepdiff": "8.6.1",  # CVE-2025-58367
    "zipp": "3.19.1",  # CVE-2024-5569
    # in no lock today, only among the test tools (checked in .venv below)
    "jinja2": "3.1.6",  # CVE-2024-22195, CVE-2024-34064, CVE-2024-56201, CVE-2024-56326, CVE-2025-27516
    "requests": "2.32.4",  # CVE-2024-35195 (2.32.0), CVE-2024-47081 (2.32.4)
    # CVE-2024-37891 (2.2.2), CVE-2025-50181, CVE-2025-50182 (2.5.0), CVE-2026-21441 (2.6.3),
    # CVE-2026-44431, CVE-2026-44432 (2.7.0)
    "urllib3": "2.7.0",
}

_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+) \\$")
_HASH = re.compile(r"^    --hash=sha256:[0-9a-f]{64}( \\)?$")


def _parse(lock: str) -> dict[NormalizedName, tuple[Version, int]]:
    """name -> (pinned version, number of sha256 hashes); fails on any line not in the lock format."""
    pins: dict[NormalizedName, tuple[Version, int]] = {}
    name: NormalizedName | None = None
    for number, line in enumerate((LOCKS / lock).read_text().splitlines(), 1):
        where = f"{lock}:{number}: {line!r}"
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line.startswith("    --hash="):
            assert name is not None and _HASH.match(line), where
            version, hashes = pins[name]
            pins[name] = (version, hashes + 1)
            continue
        pin = _PIN.match(line)
        assert pin, f"{where}: not `name==version` followed by its hashes"
        name = canonicalize_name(pin[1])
        assert name not in pins, f"{where}: pinned twice"
        pins[name] = (Version(pin[2]), 0)
    return pins


@pytest.fixture(scope="module")
def pins() -> dict[str, dict[NormalizedName, tuple[Version, int]]]:
    return {lock: _parse(lock) for lock in LOCKED}


def _applies(req: Requirement, extras: set[str]) -> bool:
    return req.marker is None or any(req.marker.evaluate({**TARGET, "extra": e}) for e in extras | {""})


def test_the_locks_are_exactly_the_four_made_by_ci_lock() -> None:
    assert sorted(p.name for p in LOCKS.glob("*.lock")) == sorted(LOCKED)
    assert "--generate-hashes" in (ROOT / ".ci" / "lock").read_text()


def test_every_pin_is_exact_and_hashed(pins: dict[str, dict[NormalizedName, tuple[Version, int]]]) -> None:
    for lock, pinned in pins.items():
        assert pinned, lock
        unhashed = sorted(name for name, (_, hashes) in pinned.items() if hashes == 0)
        assert not unhashed, f"{lock}: no --hash=sha256 for {unhashed}"


def test_every_requirement_of_pyproject_is_pinned_within_its_specifier(pins: dict[str, dict[NormalizedName, tuple[Version, int]]]) -> None:
    for lock, requirements in LOCKED.items():
        for text in requirements:
            req = Requirement(text)
            if not _applies(req, set()):
                continue
            name = canonicalize_name(req.name)
            assert name in pins[lock], f"{lock}: {req.name} is not pinned. {REFRESH}"
            version = pins[lock][name][0]
            assert req.specifier.contains(version, prereleases=True), f"{lock}: {name}=={version} is outside {text!r}. {REFRESH}"


def test_each_lock_is_closed_under_the_requirements_of_its_packages(pins: dict[str, dict[NormalizedName, tuple[Version, int]]]) -> None:
    """From pyproject's requirements down through each locked package's own requirements (its
    installed metadata, when the locked version is what is installed): all pinned, all within their
    specifiers; service.lock (all installed) holds nothing else."""
    for lock, requirements in LOCKED.items():
        pinned = pins[lock]
        todo = [r for r in map(Requirement, requirements) if _applies(r, set())]
        reached: set[NormalizedName] = set()
        seen: set[tuple[NormalizedName, frozenset[str]]] = set()
        while todo:
            req = todo.pop()
            name, extras = canonicalize_name(req.name), frozenset(req.extras)
            if (name, extras) in seen:
                continue
            seen.add((name, extras))
            reached.add(name)
            assert name in pinned, f"{lock}: {name} (needed: {req}) is not pinned. {REFRESH}"
            assert req.specifier.contains(pinned[name][0], prereleases=True), f"{lock}: {name}=={pinned[name][0]} but {req} is needed. {REFRESH}"
            try:
                dist = metadata.distribution(name)
            except metadata.PackageNotFoundError:
                continue  # not installed here (psycopg, onnxruntime-gpu): pip checks it in the image
            if Version(dist.version) != pinned[name][0]:
                continue
            todo += [r for r in map(Requirement, dist.requires or []) if _applies(r, set(extras))]
        if lock == "service.lock":
            assert reached == set(pinned), f"{lock}: pins nothing needs: {sorted(set(pinned) - reached)}. {REFRESH}"


def test_a_package_in_two_locks_has_one_version(pins: dict[str, dict[NormalizedName, tuple[Version, int]]]) -> None:
    service = pins["service.lock"]
    for lock, pinned in pins.items():
        differ = {n: (str(v), str(service[n][0])) for n, (v, _) in pinned.items() if n in service and v != service[n][0]}
        assert not differ, f"{lock} vs service.lock: {differ}. {REFRESH}"


def test_no_pin_is_below_an_advisory_floor(pins: dict[str, dict[NormalizedName, tuple[Version, int]]]) -> None:
    for lock, pinned in pins.items():
        for name, floor in ADVISORY_FLOORS.items():
            if name in pinned:
                assert pinned[name][0] >= Version(floor), f"{lock}: {name}=={pinned[name][0]} is below {floor} (advisories in tests/test_locks.py)"


def test_pyproject_floors_are_past_the_advisories_of_what_it_names() -> None:
    for text in PROJECT["dependencies"] + [r for extra in EXTRAS.values() for r in extra]:
        req = Requirement(text)
        floor = ADVISORY_FLOORS.get(canonicalize_name(req.name))
        if floor:
            lows = [Version(s.version) for s in req.specifier if s.operator in (">=", "==", "~=", ">")]
            assert lows and max(lows) >= Version(floor), f"pyproject.toml: {text!r} admits releases below {floor}"


def test_the_running_environment_holds_exactly_the_service_lock(pins: dict[str, dict[NormalizedName, tuple[Version, int]]]) -> None:
    """.ci/venv installs requirements/service.lock with --require-hashes; this proves it did (and
    that nothing installed afterwards, such as the test tools, moved a locked package)."""
    wrong = {}
    for name, (version, _) in pins["service.lock"].items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed = None
        if installed is None or Version(installed) != version:
            wrong[name] = (installed, str(version))
    assert not wrong, f"installed vs service.lock: {wrong}; run bash .ci/venv (test)"


def test_no_installed_distribution_is_below_an_advisory_floor() -> None:
    low = {}
    for dist in metadata.distributions():
        name = canonicalize_name(dist.metadata["Name"])
        if name in ADVISORY_FLOORS and Version(dist.version) < Version(ADVISORY_FLOORS[name]):
            low[name] = (dist.version, ADVISORY_FLOORS[name])
    assert not low, f"installed below an advisory floor: {low}"
