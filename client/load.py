"""``p2pchat load``: placeholder wiring; the load tool is being written."""

from __future__ import annotations

import argparse


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(func=lambda args: 1)
