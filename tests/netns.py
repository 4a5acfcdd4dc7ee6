"""Test hosts: network namespaces joined by a veth pair (root only), and tc netem on them."""

from __future__ import annotations

import secrets
import subprocess
from dataclasses import dataclass


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@dataclass
class NetnsPair:
    """Two namespaces, a and b, with private addresses that exist only inside them."""

    a: str
    b: str
    addr_a: str
    addr_b: str
    dev_a: str
    dev_b: str

    @classmethod
    def create(cls) -> NetnsPair:
        tag = secrets.token_hex(3)
        octet = int(tag[:2], 16) % 200 + 20
        pair = cls(
            f"pwa-{tag}",
            f"pwb-{tag}",
            f"10.249.{octet}.1",
            f"10.249.{octet}.2",
            f"pwva{tag}",
            f"pwvb{tag}",
        )
        try:
            pair._build()
        except BaseException:
            pair.destroy()
            raise
        return pair

    def _build(self) -> None:
        for ns in (self.a, self.b):
            ip("netns", "add", ns)
            ip("-n", ns, "link", "set", "lo", "up")
        ip("link", "add", self.dev_a, "type", "veth", "peer", "name", self.dev_b)
        for ns, dev, addr in ((self.a, self.dev_a, self.addr_a), (self.b, self.dev_b, self.addr_b)):
            ip("link", "set", dev, "netns", ns)
            ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            ip("-n", ns, "link", "set", dev, "up")

    def netem(self, ns: str, dev: str, *spec: str) -> None:
        """tc qdisc netem on one end, e.g. netem(a, dev_a, "delay", "50ms", "loss", "1%")."""
        subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                ns,
                "tc",
                "qdisc",
                "replace",
                "dev",
                dev,
                "root",
                "netem",
                *spec,
            ],
            check=True,
            capture_output=True,
        )

    def clear_netem(self, ns: str, dev: str) -> None:
        subprocess.run(
            ["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root"],
            capture_output=True,
        )

    def link(self, up: bool) -> None:
        state = "up" if up else "down"
        ip("-n", self.a, "link", "set", self.dev_a, state)
        ip("-n", self.b, "link", "set", self.dev_b, state)

    def destroy(self) -> None:
        for ns in (self.a, self.b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
