"""Outbound HTTP that only reaches public addresses, for task types that call URLs tenants give.

A tenant chooses the URL, so without a guard a worker would connect wherever the tenant
says: its own loopback (the broker's Redis on 127.0.0.1:6379), the private network, or a
cloud's metadata service. The rules:

- The host is resolved once, and every address it resolves to must be allowed; one
  refused address refuses the delivery, so a name cannot mix a public address with an
  internal one and win on the retry.
- Refused: unspecified, loopback, private, shared (100.64.0.0/10), link-local,
  multicast, broadcast, documentation, benchmarking and reserved ranges, IPv6 outside
  global unicast, and IPv6 forms that stand for an IPv4 address (IPv4-mapped, NAT64,
  6to4) when that IPv4 address is refused. Addresses in an allowed network
  (CONVEYOR_WEBHOOK_ALLOWED_NETWORKS) pass whatever their kind.
- The connection goes to the address that was checked, never to the name again, so a
  second DNS answer cannot slip in between check and connect. The request keeps the
  URL's host name: the Host header, TLS SNI and certificate verification are for it.
- Redirects are not followed: a redirect would be a second destination chosen by the
  receiver. A 3xx answer is the receiver's final answer, and the caller decides.
- Proxies from the environment are not used: through a proxy the guard would check the
  proxy's address instead of the receiver's.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterable, Sequence
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network

import httpcore
import httpx

Address = IPv4Address | IPv6Address
Network = IPv4Network | IPv6Network
Resolver = Callable[[str, int], list[Address]]

ALLOW_VARIABLE = "CONVEYOR_WEBHOOK_ALLOWED_NETWORKS"


def _table(*rows: tuple[str, str]) -> tuple[tuple[Network, str], ...]:
    return tuple((ip_network(cidr), kind) for cidr, kind in rows)


# The IANA special-purpose registries, as far as a delivery could reach something that is
# not a public receiver. The first matching row names the refusal.
IPV4_REFUSED = _table(
    # "This network"; Linux connects 0.0.0.0 to the local host.
    ("0.0.0.0/8", "unspecified"),
    ("10.0.0.0/8", "private"),
    # Carrier-grade NAT; some clouds serve their metadata from here (100.100.100.200).
    ("100.64.0.0/10", "shared"),
    ("127.0.0.0/8", "loopback"),
    # Cloud metadata (169.254.169.254) lives here.
    ("169.254.0.0/16", "link-local"),
    ("172.16.0.0/12", "private"),
    ("192.0.0.0/24", "reserved"),
    ("192.0.2.0/24", "documentation"),
    ("192.88.99.0/24", "reserved"),
    ("192.168.0.0/16", "private"),
    ("198.18.0.0/15", "benchmarking"),
    ("198.51.100.0/24", "documentation"),
    ("203.0.113.0/24", "documentation"),
    ("224.0.0.0/4", "multicast"),
    ("255.255.255.255/32", "broadcast"),
    ("240.0.0.0/4", "reserved"),
)
IPV6_REFUSED = _table(
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    # Local-use NAT64 translates into the operator's own network.
    ("64:ff9b:1::/48", "private"),
    # IPv4-compatible and IPv4-translated forms; IPv4-mapped is judged by its IPv4 first.
    ("::/8", "reserved"),
    # Protocol assignments, Teredo among them: tunnels to destinations we cannot see.
    ("2001::/23", "reserved"),
    ("2001:db8::/32", "documentation"),
    ("3fff::/20", "documentation"),
    # Unique local, where AWS's IPv6 metadata (fd00:ec2::254) lives.
    ("fc00::/7", "private"),
    ("fe80::/10", "link-local"),
    ("ff00::/8", "multicast"),
)
GLOBAL_UNICAST = ip_network("2000::/3")
NAT64 = ip_network("64:ff9b::/96")


class AddressRefused(Exception):
    """A destination the guard refuses; the message says which address and why."""


def embedded_ipv4(address: IPv6Address) -> tuple[str, IPv4Address] | None:
    """The IPv4 address an IPv6 address stands for, with the form's name, or None."""
    if address.ipv4_mapped is not None:
        return "IPv4-mapped", address.ipv4_mapped
    if address in NAT64:
        return "NAT64", IPv4Address(int(address) & 0xFFFFFFFF)
    if address.sixtofour is not None:
        return "6to4", address.sixtofour
    return None


def kind_of(address: Address) -> str | None:
    """What sort of non-public address this is ("loopback", "private", ...), or None."""
    if isinstance(address, IPv4Address):
        return next((kind for net, kind in IPV4_REFUSED if address in net), None)
    inner = embedded_ipv4(address)
    if inner is not None:
        return kind_of(inner[1])
    kind = next((kind for net, kind in IPV6_REFUSED if address in net), None)
    if kind is None and address not in GLOBAL_UNICAST:
        return "reserved"
    return kind


def is_allowed(address: Address, allowed: Iterable[Network]) -> bool:
    """Whether the address, or the IPv4 address it stands for, is in an allowed network."""
    candidates: list[Address] = [address]
    if isinstance(address, IPv6Address) and (inner := embedded_ipv4(address)) is not None:
        candidates.append(inner[1])
    return any(candidate in net for net in allowed for candidate in candidates)


def refusal(address: Address, allowed: Iterable[Network] = ()) -> str | None:
    """Why a delivery may not connect to this address ("a loopback address"), or None."""
    if is_allowed(address, allowed):
        return None
    kind = kind_of(address)
    if kind is None:
        return None
    article = "an" if kind[0] in "aeiou" else "a"
    reason = f"{article} {kind} address"
    if isinstance(address, IPv6Address) and (inner := embedded_ipv4(address)) is not None:
        reason += f" ({inner[0]} {inner[1]})"
    return reason


def check(host: str, addresses: Sequence[Address], allowed: Iterable[Network] = ()) -> None:
    """Raise AddressRefused unless every address `host` resolved to may be reached."""
    allowed = tuple(allowed)
    for address in addresses:
        reason = refusal(address, allowed)
        if reason is None:
            continue
        if _is_literal(host):
            subject = f"{address} is {reason}"
        else:
            subject = f"{host} resolves to {address}, {reason}"
        raise AddressRefused(f"refused: {subject}; allow it with {ALLOW_VARIABLE}")


def _is_literal(host: str) -> bool:
    try:
        ip_address(host)
    except ValueError:
        return False
    return True


def resolve(host: str, port: int) -> list[Address]:
    """Every address `host` resolves to for TCP, in the resolver's order, each once."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as error:
        # A name that does not resolve now may later: a network error, worth a retry.
        raise httpcore.ConnectError(f"cannot resolve {host}: {error}") from error
    found: list[Address] = []
    for family, _type, _proto, _name, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        address = ip_address(sockaddr[0])
        if address not in found:
            found.append(address)
    return found


class GuardedBackend(httpcore.NetworkBackend):
    """httpcore's network layer: resolves each host once, checks, connects to what it checked."""

    def __init__(
        self,
        allowed: Iterable[Network] = (),
        *,
        resolver: Resolver = resolve,
        connector: httpcore.NetworkBackend | None = None,
    ) -> None:
        self.allowed = tuple(allowed)
        self._resolve = resolver
        self._connector = connector or httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        """A connection to the first reachable address of `host`, all of them checked first."""
        addresses = self._resolve(host, port)
        if not addresses:
            raise httpcore.ConnectError(f"{host} resolves to no IP address")
        check(host, addresses, self.allowed)
        failures: list[httpcore.ConnectError | httpcore.ConnectTimeout] = []
        for address in addresses:
            try:
                # An address literal: the connector has no name left to look up.
                return self._connector.connect_tcp(
                    str(address),
                    port,
                    timeout=timeout,
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as error:
                failures.append(error)
        raise failures[-1]

    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        """Never: a Unix socket is a local destination."""
        raise AddressRefused(f"refused: {path} is a Unix socket")

    def sleep(self, seconds: float) -> None:
        """Wait between connection retries."""
        time.sleep(seconds)


class GuardedTransport(httpx.HTTPTransport):
    """httpx's own transport, its connection pool built on a GuardedBackend."""

    def __init__(self, backend: GuardedBackend) -> None:
        ssl_context = httpx.create_ssl_context()
        super().__init__(verify=ssl_context)
        # HTTPTransport takes no network backend, so its pool is replaced by one that has
        # it; handle_request and close use nothing else of the pool.
        self._pool = httpcore.ConnectionPool(ssl_context=ssl_context, network_backend=backend)


def guarded_client(backend: GuardedBackend, *, timeout: float) -> httpx.Client:
    """An httpx client connecting only through `backend`: no redirects, no env proxies."""
    return httpx.Client(
        transport=GuardedTransport(backend),
        timeout=timeout,
        follow_redirects=False,
        trust_env=False,
    )
