"""The two kinds of workload every failure scenario runs with: pagewire.client (which
negotiates POISON and waits for the agent's verdict) and a Firecracker-shaped process
(EVENT_REMOVE only, two regions, both page-size keys, socket and uffd held open)."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

from pagewire.tools.workload import command as client_command

KINDS = ["client", "firecracker"]
FC_WORKLOAD = Path(__file__).with_name("fc_workload.py")
SIGBUS_EXIT = -signal.SIGBUS
KILLED_EXIT = -signal.SIGKILL


def workload_command(kind: str, socket_path: str, size: int, *args: str) -> list[str]:
    """The command line of a workload of this kind; both take the same flags."""
    if kind == "client":
        return client_command(socket_path, size, *args)
    return [sys.executable, str(FC_WORKLOAD), "--socket", socket_path, "--size", str(size), *args]
