"""Hosts on this machine as Linux network namespaces, joined by veth pairs on one private
link, for tests of what crosses a network.

Host A holds the database and the broker: a relay (tests/netns_relay.py) listens on A's
address and forwards each connection to the service on this machine's loopback, so the
real PostgreSQL, Redis and RabbitMQ serve the other hosts as if they ran on A. Hosts B
and C reach A over their own veth pair, bridged on A; cutting one host's link (`ip link
set … down`) partitions it from the database and the broker at once, as a pulled cable
would. Nothing is routed off the machine: the link's addresses are 10.231.0.0/24 and
nothing else is configured.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tests.support import ROOT

SUBNET = "10.231.0"
HOST_A = f"{SUBNET}.1"


class NamespacesRefused(RuntimeError):
    """This machine does not let the tests make network namespaces."""


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


@dataclass
class Hosts:
    """Namespaces named `<prefix>a`, `<prefix>b`, … and the processes started in them."""

    prefix: str
    names: list[str]
    links: dict[str, str] = field(default_factory=dict)

    def namespace(self, host: str) -> str:
        """The namespace of a host ("a", "b", "c")."""
        return f"{self.prefix}{host}"

    def address(self, host: str) -> str:
        """A host's address on the link."""
        return f"{SUBNET}.{self.names.index(host) + 1}"

    def argv(self, host: str, argv: list[str]) -> list[str]:
        """`argv` run on a host."""
        return ["ip", "netns", "exec", self.namespace(host), *argv]

    def cut(self, host: str) -> None:
        """Take a host's link down: it reaches nothing, and nothing reaches it."""
        _ip("-n", self.namespace(host), "link", "set", self.links[host], "down")

    def restore(self, host: str) -> None:
        """Bring a host's link back up."""
        _ip("-n", self.namespace(host), "link", "set", self.links[host], "up")

    def relay(self, ports: list[int], log: Path) -> subprocess.Popen[bytes]:
        """Forward host A's `ports` to this machine's loopback, in a process of its own."""
        handle = log.open("ab")
        return subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "tests" / "netns_relay.py"),
                self.namespace("a"),
                *[str(p) for p in ports],
            ],
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _remove(prefix: str, names: list[str]) -> None:
    for name in names:
        subprocess.run(
            ["ip", "netns", "delete", f"{prefix}{name}"], capture_output=True, check=False
        )


@contextmanager
def hosts(names: tuple[str, ...] = ("a", "b", "c")) -> Iterator[Hosts]:
    """Make the hosts: A bridges the others' veth pairs, each host gets an address."""
    prefix = f"cv{os.getpid() % 100000}"
    made = Hosts(prefix, list(names))
    try:
        try:
            _ip("netns", "add", made.namespace("a"))
        except RuntimeError as error:
            raise NamespacesRefused(
                f"network namespaces are not permitted here (ip netns add, as root): {error}"
            ) from None
        for host in names[1:]:
            _ip("netns", "add", made.namespace(host))
        a = made.namespace("a")
        for host in names:
            _ip("-n", made.namespace(host), "link", "set", "lo", "up")
        _ip("-n", a, "link", "add", "br0", "type", "bridge")
        _ip("-n", a, "addr", "add", f"{HOST_A}/24", "dev", "br0")
        _ip("-n", a, "link", "set", "br0", "up")
        for host in names[1:]:
            inner, outer = f"{prefix}{host}0", f"{prefix}{host}1"
            _ip("link", "add", inner, "type", "veth", "peer", "name", outer)
            _ip("link", "set", inner, "netns", made.namespace(host))
            _ip("link", "set", outer, "netns", a)
            _ip("-n", a, "link", "set", outer, "master", "br0")
            _ip("-n", a, "link", "set", outer, "up")
            _ip("-n", made.namespace(host), "addr", "add", f"{made.address(host)}/24", "dev", inner)
            _ip("-n", made.namespace(host), "link", "set", inner, "up")
            made.links[host] = inner
        yield made
    finally:
        _remove(prefix, list(names))
