"""The guarded fetch on its own: which addresses are refused, the allow-list's patterns, and the
resolver that checks the very addresses aiohttp then connects to (a name resolving to a refused
address never gets a connection, whatever it resolved to before)."""

from __future__ import annotations

import ipaddress
import re
import socket

import pytest
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from comfy_orchestrator.service.fetch import (
    Fetcher,
    FetchPolicy,
    FetchRefused,
    GuardedResolver,
    address_refusal,
    host_pattern,
)
from comfy_orchestrator.service.settings import ServiceSettings, SettingsError
from tests.service.test_inputs_url import PNG, origin

LOOPBACK = (ipaddress.ip_network("127.0.0.1/32"),)


@pytest.mark.parametrize(("address", "why"), [
    ("127.0.0.1", "loopback"), ("127.8.9.10", "loopback"), ("::1", "loopback"),
    ("10.1.2.3", "private"), ("172.16.0.1", "private"), ("192.168.1.1", "private"),
    ("169.254.169.254", "link-local"), ("fe80::1", "link-local"), ("fe80::1%eth0", "link-local"),
    ("100.64.0.1", "not a global"), ("224.0.0.251", "multicast"), ("ff02::1", "multicast"),
    ("0.0.0.0", "unspecified"), ("::", "unspecified"), ("fd12:3456::1", "private"),
    ("240.0.0.1", "reserved"), ("255.255.255.255", "reserved"),
    ("::ffff:127.0.0.1", "loopback"), ("::ffff:169.254.169.254", "link-local"), ("::ffff:10.0.0.1", "private"),
    ("2002:a9fe:a9fe::1", "embeds 169.254.169.254"), ("2002:7f00:1::", "embeds 127.0.0.1"),
    ("64:ff9b::a9fe:a9fe", "reserved"),
])
def test_non_global_addresses_are_refused(address: str, why: str) -> None:
    refusal = address_refusal(address)
    assert refusal is not None
    assert why in refusal


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8"])
def test_global_addresses_pass(address: str) -> None:
    assert address_refusal(address) is None


def test_allow_networks_open_exactly_what_they_list() -> None:
    networks = (ipaddress.ip_network("10.0.0.0/8"), *LOOPBACK)
    assert address_refusal("10.20.30.40", networks) is None
    assert address_refusal("::ffff:10.20.30.40", networks) is None
    assert address_refusal("127.0.0.1", networks) is None
    assert address_refusal("127.0.0.2", networks) is not None
    assert address_refusal("169.254.169.254", networks) is not None
    assert address_refusal("192.168.0.1", networks) is not None


def test_allow_list_patterns() -> None:
    policy = FetchPolicy(("images.example.com", "*.cdn.example.org", "files.example.net:8443", "[2001:db8::1]"))
    allowed = ["https://images.example.com/a.png", "http://IMAGES.example.com./a.png", "https://a.cdn.example.org/x",
               "https://a.b.cdn.example.org/x", "https://files.example.net:8443/x"]
    refused = ["https://images.example.com:8443/a.png", "https://evil.com/?images.example.com",
               "https://images.example.com.evil.com/", "https://cdn.example.org/x", "https://xcdn.example.org/x",
               "https://files.example.net/x", "https://user:pw@images.example.com/a.png"]
    for url in allowed:
        policy.check_url(URL(url))
    for url in refused:
        with pytest.raises(FetchRefused):
            policy.check_url(URL(url))
    with pytest.raises(FetchRefused) as info:
        policy.check_url(URL("http://[2001:db8::1]/x"))  # allow-listed, but not a global address
    assert info.value.reason == "address"
    assert not FetchPolicy(()).enabled


@pytest.mark.parametrize("entry", ["", "http://x.com", "a/b", "x.com:0", "x.com:99999", "*", "a.*.com", "x.com:ab"])
def test_bad_allow_list_entries_are_refused_at_load(entry: str) -> None:
    with pytest.raises(ValueError, match="url_allow entry"):
        host_pattern(entry)
    with pytest.raises(SettingsError, match="url_allow"):
        ServiceSettings.from_mapping({"inputs": {"url_allow": [entry]}})
    with pytest.raises(SettingsError, match="allow_networks"):
        ServiceSettings.from_mapping({"inputs": {"allow_networks": ["10.0.0.1/8"]}})  # not a network address


class ScriptedResolver(AbstractResolver):
    """Answers each name from a script, one answer per lookup (the last repeats): a rebinding DNS."""

    def __init__(self, script: dict[str, list[list[str]]]) -> None:
        self.script = script
        self.lookups: list[str] = []

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
                      ) -> list[ResolveResult]:
        self.lookups.append(host)
        answers = self.script[host]
        addresses = answers.pop(0) if len(answers) > 1 else answers[0]
        return [ResolveResult(hostname=host, host=a, port=port, family=socket.AF_INET, proto=0,
                              flags=socket.AI_NUMERICHOST) for a in addresses]

    async def close(self) -> None:
        pass


async def test_resolver_refuses_a_name_once_it_rebinds_to_a_refused_address() -> None:
    inner = ScriptedResolver({"rebind.test": [["127.0.0.1"], ["127.0.0.2"]],
                              "mixed.test": [["127.0.0.1", "169.254.169.254"]]})
    resolver = GuardedResolver(LOOPBACK, inner)
    [first] = await resolver.resolve("rebind.test", 80)
    assert first["host"] == "127.0.0.1"
    with pytest.raises(OSError, match=re.escape("127.0.0.2 is a loopback address")):
        await resolver.resolve("rebind.test", 80)
    with pytest.raises(OSError, match=re.escape("169.254.169.254")):  # one bad address refuses the name
        await resolver.resolve("mixed.test", 80)


async def test_fetch_connects_to_the_address_the_guard_checked() -> None:
    async with origin() as src:
        inner = ScriptedResolver({"images.test": [["127.0.0.1"]], "inside.test": [["127.0.0.2"]]})
        fetcher = Fetcher(FetchPolicy((f"images.test:{src.port}", f"inside.test:{src.port}"), LOOPBACK),
                          max_bytes=1 << 20, timeout_s=10, resolver=inner)
        try:
            fetched = await fetcher.fetch(f"http://images.test:{src.port}/img.png")
            assert fetched.data == PNG
            assert inner.lookups == ["images.test"]
            with pytest.raises(FetchRefused, match=re.escape("inside.test resolves to 127.0.0.2")) as info:
                await fetcher.fetch(f"http://inside.test:{src.port}/img.png")
            assert info.value.reason == "address"
            with pytest.raises(FetchRefused) as info:  # a redirect to it is refused the same way
                await fetcher.fetch(f"http://images.test:{src.port}/to?url=http://inside.test:{src.port}/img.png")
            assert info.value.reason == "address"
            assert src.hits["/img.png"] == 1
        finally:
            await fetcher.close()
