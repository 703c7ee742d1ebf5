"""Wiring and lifetime: builds every part the config enables, runs until SIGTERM/SIGINT, stops in reverse."""

from __future__ import annotations

import argparse


def main(args: argparse.Namespace) -> int:
    raise SystemExit(f"relay {args.command}: not wired yet")
