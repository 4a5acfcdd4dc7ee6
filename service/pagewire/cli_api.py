"""CLI commands that talk to an agent's REST API (filled in with the control plane)."""

from __future__ import annotations

import argparse
from typing import Any


def add_api_commands(sub: Any) -> None:
    del sub
    return None


__all__ = ["add_api_commands", "argparse"]
