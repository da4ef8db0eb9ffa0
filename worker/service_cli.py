"""Service subcommands of ``scsnet`` (serve, worker, apikey, submit); filled in by the service."""

from __future__ import annotations

import argparse

COMMANDS: frozenset[str] = frozenset()


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register the service subcommands on the ``scsnet`` parser."""


def run(args: argparse.Namespace) -> int:
    """Run one of :data:`COMMANDS`; returns the exit status."""
    raise NotImplementedError(args.command)
