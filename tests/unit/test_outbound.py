"""The outbound guard: which addresses are refused, the allowed-networks setting, and that
connections go only to checked addresses (through fakes: the unit tier does no I/O)."""

from __future__ import annotations

import os
import socket
import ssl
from collections.abc import Iterable
from ipaddress import IPv4Network, IPv6Network, ip_address, ip_network
from pathlib import Path
from typing import Any

import httpcore
import pytest

from conveyor.config.settings import Settings, SettingsError, load_settings
from conveyor.tasks import outbound, webhook
from conveyor.tasks.outbound import AddressRefused, GuardedBackend, check, guarded_client, refusal
from conveyor.tasks.registry import PermanentError

OK = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
HINT = "allow it with CONVEYOR_WEBHOOK_ALLOWED_NETWORKS"


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "a loopback address"),
        ("127.255.0.9", "a loopback address"),
        ("0.0.0.0", "an unspecified address"),
        ("0.1.2.3", "an unspecified address"),
        ("10.0.0.1", "a private address"),
        ("172.16.5.4", "a private address"),
        ("172.31.255.255", "a private address"),
        ("192.168.1.1", "a private address"),
        ("100.64.0.1", "a shared address"),
        ("100.100.100.200", "a shared address"),
        ("169.254.169.254", "a link-local address"),
        ("224.0.0.251", "a multicast address"),
        ("239.255.255.250", "a multicast address"),
        ("255.255.255.255", "a broadcast address"),
        ("240.0.0.1", "a reserved address"),
        ("192.0.0.192", "a reserved address"),
        ("192.0.2.10", "a documentation address"),
        ("198.18.0.1", "a benchmarking address"),
        ("::1", "a loopback address"),
        ("::", "an unspecified address"),
        ("fd00:ec2::254", "a private address"),
        ("fe80::1", "a link-local address"),
        ("ff02::1", "a multicast address"),
        ("2001:db8::1", "a documentation address"),
        ("2001::1", "a reserved address"),
        ("::7f00:1", "a reserved address"),
        ("4000::1", "a reserved address"),
        ("::ffff:127.0.0.1", "a loopback address (IPv4-mapped 127.0.0.1)"),
        ("::ffff:169.254.169.254", "a link-local address (IPv4-mapped 169.254.169.254)"),
        ("::ffff:10.1.1.1", "a private address (IPv4-mapped 10.1.1.1)"),
        ("64:ff9b::7f00:1", "a loopback address (NAT64 127.0.0.1)"),
        ("64:ff9b:1::a00:1", "a private address"),
        ("2002:7f00:1::1", "a loopback address (6to4 127.0.0.1)"),
        ("2002:c0a8:101::1", "a private address (6to4 192.168.1.1)"),
    ],
)
def test_non_public_addresses_are_refused_with_their_kind(address: str, reason: str) -> None:
    assert refusal(ip_address(address)) == reason


@pytest.mark.parametrize(
    "address",
    [
        "8.8.8.8",
        "1.1.1.1",
        "93.184.215.14",
        "100.63.255.255",
        "100.128.0.0",
        "172.32.0.1",
        "2606:4700:4700::1111",
        "2a00:1450:4001::200e",
        "::ffff:8.8.8.8",
        "64:ff9b::808:808",
        "2002:808:808::1",
    ],
)
def test_public_addresses_pass(address: str) -> None:
    assert refusal(ip_address(address)) is None


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.9.9.9",
        "172.20.0.1",
        "192.168.0.1",
        "169.254.0.1",
        "0.0.0.0",
        "224.1.1.1",
        "240.0.0.1",
        "192.0.0.1",
        "198.51.100.1",
        "203.0.113.1",
        "::1",
        "::",
        "fc00::1",
        "fe80::abcd",
        "fec0::1",
        "ff05::2",
        "100::1",
        "2001:db8:1::1",
        "::ffff:192.168.1.1",
    ],
)
def test_whatever_the_standard_library_calls_non_public_is_refused(address: str) -> None:
    parsed = ip_address(address)
    flags = ["is_private", "is_loopback", "is_link_local", "is_multicast", "is_reserved"]
    flags += ["is_unspecified", "is_site_local"] if parsed.version == 6 else ["is_unspecified"]
    assert not parsed.is_global or any(getattr(parsed, flag) for flag in flags)
    assert refusal(parsed) is not None


def test_allowed_networks_let_their_addresses_through_and_no_others() -> None:
    loopback = [ip_network("127.0.0.0/8")]
    assert refusal(ip_address("127.0.0.1"), loopback) is None
    assert refusal(ip_address("::ffff:127.0.0.1"), loopback) is None
    assert refusal(ip_address("::1"), loopback) == "a loopback address"
    assert refusal(ip_address("10.0.0.1"), loopback) == "a private address"
    office = [ip_network("10.20.0.0/16"), ip_network("fd12:3456::/32")]
    assert refusal(ip_address("10.20.7.7"), office) is None
    assert refusal(ip_address("10.21.0.1"), office) == "a private address"
    assert refusal(ip_address("fd12:3456::9"), office) is None
    assert refusal(ip_address("169.254.169.254"), office) == "a link-local address"


def test_refusal_names_the_address_the_host_and_the_setting() -> None:
    with pytest.raises(AddressRefused) as literal:
        check("127.0.0.1", [ip_address("127.0.0.1")])
    assert str(literal.value) == f"refused: 127.0.0.1 is a loopback address; {HINT}"
    with pytest.raises(AddressRefused) as named:
        check("localhost", [ip_address("::1"), ip_address("127.0.0.1")])
    assert str(named.value) == f"refused: localhost resolves to ::1, a loopback address; {HINT}"


def test_one_internal_address_among_public_ones_refuses_the_host() -> None:
    check("example.com", [ip_address("93.184.215.14"), ip_address("2606:2800:21f::1")])
    with pytest.raises(AddressRefused, match=r"rebind\.example resolves to 10\.0\.0\.5"):
        check("rebind.example", [ip_address("93.184.215.14"), ip_address("10.0.0.5")])


class FakeStream(httpcore.NetworkStream):
    """A connection answering one canned response, recording what was sent and TLS use."""

    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.sent = b""
        self.tls: tuple[ssl.SSLContext, str | None] | None = None

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        chunk, self.answer = self.answer[:max_bytes], self.answer[max_bytes:]
        return chunk

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self.sent += buffer

    def close(self) -> None:
        pass

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        self.tls = (ssl_context, server_hostname)
        return self

    def get_extra_info(self, info: str) -> Any:
        return None


class FakeConnector(httpcore.NetworkBackend):
    """Records every connection asked for; addresses in `down` fail to connect."""

    def __init__(self, answer: bytes = OK, down: Iterable[str] = ()) -> None:
        self.answer = answer
        self.down = set(down)
        self.attempts: list[tuple[str, int]] = []
        self.streams: list[FakeStream] = []

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        self.attempts.append((host, port))
        if host in self.down:
            raise httpcore.ConnectError(f"{host} is down")
        stream = FakeStream(self.answer)
        self.streams.append(stream)
        return stream


def fake_dns(table: dict[str, list[str]]) -> outbound.Resolver:
    lookups: list[str] = []

    def resolve(host: str, port: int) -> list[outbound.Address]:
        lookups.append(host)
        return [ip_address(a) for a in table[host]]

    resolve.lookups = lookups  # type: ignore[attr-defined]
    return resolve


def test_refused_address_makes_no_connection() -> None:
    connector = FakeConnector()
    backend = GuardedBackend(resolver=fake_dns({"127.0.0.1": ["127.0.0.1"]}), connector=connector)
    with pytest.raises(AddressRefused):
        backend.connect_tcp("127.0.0.1", 6379)
    assert connector.attempts == []


def test_connection_goes_to_the_checked_address_not_the_name() -> None:
    connector = FakeConnector(down=["2606:2800:21f::1"])
    dns = fake_dns({"hooks.example": ["2606:2800:21f::1", "93.184.215.14"]})
    backend = GuardedBackend(resolver=dns, connector=connector)
    backend.connect_tcp("hooks.example", 443, timeout=3.0)
    # Resolved once; each address tried in order, as an address literal.
    assert dns.lookups == ["hooks.example"]  # type: ignore[attr-defined]
    assert connector.attempts == [("2606:2800:21f::1", 443), ("93.184.215.14", 443)]


def test_every_address_down_is_a_connect_error() -> None:
    connector = FakeConnector(down=["93.184.215.14"])
    backend = GuardedBackend(
        resolver=fake_dns({"hooks.example": ["93.184.215.14"]}), connector=connector
    )
    with pytest.raises(httpcore.ConnectError):
        backend.connect_tcp("hooks.example", 80)


def test_a_name_without_addresses_is_a_connect_error() -> None:
    connector = FakeConnector()
    backend = GuardedBackend(resolver=fake_dns({"empty.example": []}), connector=connector)
    with pytest.raises(httpcore.ConnectError, match="resolves to no IP address"):
        backend.connect_tcp("empty.example", 80)
    assert connector.attempts == []


def test_unix_sockets_are_refused() -> None:
    with pytest.raises(AddressRefused):
        GuardedBackend().connect_unix_socket("/var/run/redis.sock")


def test_unresolvable_name_is_a_connect_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_such_name(*_args: Any, **_kwargs: Any) -> Any:
        raise OSError(-2, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_such_name)
    with pytest.raises(httpcore.ConnectError, match=r"cannot resolve nowhere\.invalid"):
        outbound.resolve("nowhere.invalid", 80)


def test_https_keeps_the_host_name_for_host_header_sni_and_verification() -> None:
    connector = FakeConnector()
    backend = GuardedBackend(
        resolver=fake_dns({"hooks.example": ["93.184.215.14"]}), connector=connector
    )
    with guarded_client(backend, timeout=5.0) as client:
        response = client.post("https://hooks.example/in", json={"a": 1})
    assert response.status_code == 200
    assert connector.attempts == [("93.184.215.14", 443)]
    stream = connector.streams[0]
    assert stream.tls is not None
    context, server_hostname = stream.tls
    assert server_hostname == "hooks.example"
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert b"\r\nhost: hooks.example\r\n" in stream.sent.lower()


def test_redirects_are_not_followed() -> None:
    redirect = (
        b"HTTP/1.1 302 Found\r\nlocation: http://169.254.169.254/\r\ncontent-length: 0\r\n\r\n"
    )
    connector = FakeConnector(answer=redirect)
    dns = fake_dns({"hooks.example": ["93.184.215.14"], "169.254.169.254": ["169.254.169.254"]})
    backend = GuardedBackend(resolver=dns, connector=connector)
    with guarded_client(backend, timeout=5.0) as client:
        assert client.post("http://hooks.example/in", json={}).status_code == 302
    assert connector.attempts == [("93.184.215.14", 80)]


def test_environment_proxies_are_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTP_PROXY", "http://10.0.0.1:3128")
    monkeypatch.setenv("ALL_PROXY", "http://10.0.0.1:3128")
    connector = FakeConnector()
    backend = GuardedBackend(
        resolver=fake_dns({"hooks.example": ["93.184.215.14"]}), connector=connector
    )
    with guarded_client(backend, timeout=5.0) as client:
        client.post("http://hooks.example/in", json={})
    assert connector.attempts == [("93.184.215.14", 80)]


class Context:
    job_id = "0190d7a4-0000-7000-8000-000000000001"
    attempt = 1

    def cancelled(self) -> bool:
        return False

    def set_progress(self, progress: Any) -> None:
        pass


def deliver_with(
    monkeypatch: pytest.MonkeyPatch, url: str, connector: FakeConnector, allowed: str = ""
) -> Any:
    """Run webhook.deliver against fakes, with these allowed networks in its settings."""
    settings = Settings(_env_file=None, webhook_allowed_networks=allowed)
    monkeypatch.setattr(webhook, "get_settings", lambda: settings)
    dns = fake_dns({"127.0.0.1": ["127.0.0.1"], "localhost": ["127.0.0.1"]})

    def backend(networks: Iterable[IPv4Network | IPv6Network]) -> GuardedBackend:
        return GuardedBackend(networks, resolver=dns, connector=connector)

    monkeypatch.setattr(outbound, "GuardedBackend", backend)
    payload = webhook.WebhookPayload.model_validate({"url": url, "body": {"n": 1}})
    return webhook.deliver(payload, Context())


def test_deliver_refuses_permanently_without_connecting(monkeypatch: pytest.MonkeyPatch) -> None:
    connector = FakeConnector()
    with pytest.raises(PermanentError) as caught:
        deliver_with(monkeypatch, "http://127.0.0.1:6379/", connector)
    assert isinstance(caught.value, webhook.DeliveryRefused)
    assert str(caught.value) == f"refused: 127.0.0.1 is a loopback address; {HINT}"
    assert connector.attempts == []


def test_deliver_reaches_an_allowed_network(monkeypatch: pytest.MonkeyPatch) -> None:
    connector = FakeConnector()
    result = deliver_with(monkeypatch, "http://localhost:8080/hook", connector, "127.0.0.0/8")
    assert result == {"status": 200}
    assert connector.attempts == [("127.0.0.1", 8080)]
    sent = connector.streams[0].sent.lower()
    assert b"\r\nidempotency-key: 0190d7a4-0000-7000-8000-000000000001\r\n" in sent
    assert b"\r\nhost: localhost:8080\r\n" in sent


def test_deliver_treats_a_redirect_as_permanent(monkeypatch: pytest.MonkeyPatch) -> None:
    redirect = (
        b"HTTP/1.1 307 Temporary Redirect\r\nlocation: /elsewhere\r\ncontent-length: 0\r\n\r\n"
    )
    connector = FakeConnector(answer=redirect)
    with pytest.raises(PermanentError, match="307, a redirect to /elsewhere; redirects are not"):
        deliver_with(monkeypatch, "http://127.0.0.1:8080/hook", connector, "127.0.0.1/32")
    assert len(connector.attempts) == 1


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No CONVEYOR_* variable from outside, and an empty cwd so no .env is read."""
    for name in list(os.environ):
        if name.upper().startswith("CONVEYOR_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


@pytest.mark.usefixtures("clean_environment")
def test_no_network_is_allowed_by_default() -> None:
    assert load_settings().webhook_allowed_networks == ()


@pytest.mark.usefixtures("clean_environment")
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.0/8", ["127.0.0.0/8"]),
        (" 10.20.0.0/16 , fd00::/8,", ["10.20.0.0/16", "fd00::/8"]),
        ("192.168.1.7", ["192.168.1.7/32"]),
        ("", []),
    ],
)
def test_allowed_networks_are_comma_separated_cidrs(
    monkeypatch: pytest.MonkeyPatch, value: str, expected: list[str]
) -> None:
    monkeypatch.setenv("CONVEYOR_WEBHOOK_ALLOWED_NETWORKS", value)
    networks = load_settings().webhook_allowed_networks
    assert [str(net) for net in networks] == expected


@pytest.mark.usefixtures("clean_environment")
@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("banana", "'banana' is not a network in CIDR notation"),
        ("10.0.0.0/8,10.0.0.0/33", "'10.0.0.0/33' is not a network in CIDR notation"),
        ("10.0.0.1/8", "'10.0.0.1/8' has host bits set; the network is 10.0.0.0/8"),
        ('["10.0.0.0/8"]', "is not a network in CIDR notation"),
        ("10.0.0.0/8;192.168.0.0/16", "is not a network in CIDR notation"),
    ],
)
def test_invalid_network_is_one_line_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, value: str, says: str
) -> None:
    monkeypatch.setenv("CONVEYOR_WEBHOOK_ALLOWED_NETWORKS", value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    message = str(caught.value)
    assert message.startswith("invalid setting CONVEYOR_WEBHOOK_ALLOWED_NETWORKS: ")
    assert says in message
    assert "\n" not in message
    assert caught.value.__cause__ is None
