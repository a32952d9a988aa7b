"""Fetching an input image from a URL without letting a request reach inside the network.

    FetchPolicy     which hosts may be asked (``url_allow``) and which addresses may be connected
                    to: global unicast only, unless an operator lists a network in ``allow_networks``
    GuardedResolver an aiohttp resolver that refuses a name resolving to any address the policy
                    refuses; aiohttp connects to exactly the addresses it returns, so the address
                    checked is the address connected to (no second lookup, no DNS-rebinding window)
    Fetcher         one long-lived session over that resolver; ``fetch(url)`` follows redirects
                    itself (at most ``max_redirects``), re-checking scheme, allow-list and address
                    on every hop, and caps the size and the time of the whole fetch

An IP-literal host never goes through a resolver (aiohttp connects to it directly), so it is
checked before the request instead. Errors::

    FetchError (ComfyOrchestratorError)
    ├── FetchRefused        the policy says no: URL, scheme, host or address (``reason`` names it)
    ├── FetchTooLarge       the body is over ``max_bytes``
    └── FetchFailed         the server could not be reached, answered non-2xx, redirected too
                            often, or took too long
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from comfy_orchestrator.errors import ComfyOrchestratorError

__all__ = [
    "FetchError",
    "FetchFailed",
    "FetchPolicy",
    "FetchRefused",
    "FetchTooLarge",
    "Fetched",
    "Fetcher",
    "GuardedResolver",
    "address_refusal",
    "host_pattern",
]

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_SCHEMES = {"http": 80, "https": 443}
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_CHUNK = 1 << 16


class FetchError(ComfyOrchestratorError):
    """A URL input could not be fetched."""


class FetchRefused(FetchError):
    """The policy refuses this URL (``reason``: ``url``, ``scheme``, ``host`` or ``address``)."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class FetchTooLarge(FetchError):
    """The body is larger than allowed."""


class FetchFailed(FetchError):
    """The fetch itself failed: unreachable, a non-2xx answer, too many redirects, too slow."""


class _AddressRefused(OSError):
    """Raised inside the resolver; aiohttp wraps it in a ClientConnectorError."""

    def __init__(self, refusal: FetchRefused) -> None:
        super().__init__(str(refusal))
        self.refusal = refusal


def _embedded_v4(addr: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    if addr.sixtofour is not None:
        return addr.sixtofour
    if addr.teredo is not None:
        return addr.teredo[1]
    if addr in _NAT64:
        return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    return None


def address_refusal(address: str | IPAddress, allow_networks: Sequence[IPNetwork] = ()) -> str | None:
    """Why ``address`` may not be connected to, or None when it may: it must be global unicast
    (not loopback, private, link-local — the 169.254.169.254 metadata address included —, CGNAT,
    multicast, reserved or unspecified), and so must an IPv4 address embedded in an IPv6 one,
    unless it lies in one of ``allow_networks``."""
    addr = ipaddress.ip_address(address.split("%", 1)[0] if isinstance(address, str) else address)
    embedded = _embedded_v4(addr) if isinstance(addr, ipaddress.IPv6Address) else None
    if addr.version == 6 and addr.ipv4_mapped is not None:
        addr, embedded = addr.ipv4_mapped, None  # ::ffff:a.b.c.d is a.b.c.d on the wire
    if any(addr in net for net in allow_networks if net.version == addr.version):
        return None
    for name in ("loopback", "link_local", "multicast", "unspecified", "reserved", "private"):
        if getattr(addr, f"is_{name}"):
            label = name.replace("_", "-")
            return f"{addr} is {'an' if label[0] in 'aeiou' else 'a'} {label} address"
    if not addr.is_global:
        return f"{addr} is not a global address"
    if embedded is not None:
        inner = address_refusal(embedded, allow_networks)
        if inner is not None:
            return f"{addr} embeds {embedded}: {inner}"
    return None


def host_pattern(entry: str) -> tuple[str, int | None]:
    """``"Example.COM:8443"`` → ``("example.com", 8443)``; ``"[::1]"``, ``"*.example.com"`` too.
    Raises ValueError for an entry that is not a host pattern."""
    text = entry.strip().lower()
    port: str | None = None
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"url_allow entry {entry!r}: expected [address]:port")
            port = rest[1:]
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host = text
    host = host.rstrip(".")
    if not host or any(c in host for c in "/?#@ ") or "*" in host.removeprefix("*."):
        raise ValueError(f"url_allow entry {entry!r}: expected a host name, *.suffix or address, "
                         "with an optional :port")
    if port is None:
        return host, None
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"url_allow entry {entry!r}: the port must be 1-65535")
    return host, int(port)


@dataclass(frozen=True)
class FetchPolicy:
    """``url_allow``: ``host``, ``*.example.com`` (its subdomains) or either with ``:port``; without a
    port only the scheme's default port (80, 443) matches. ``allow_networks``: networks an operator
    lets the service connect to although they are not global (e.g. ``10.0.0.0/8``)."""

    url_allow: tuple[str, ...] = ()
    allow_networks: tuple[IPNetwork, ...] = ()
    patterns: tuple[tuple[str, int | None], ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "patterns", tuple(host_pattern(e) for e in self.url_allow))

    @property
    def enabled(self) -> bool:
        return bool(self.patterns)

    def check_url(self, url: URL) -> None:
        """Raise FetchRefused unless ``url`` is http(s) to an allow-listed host and port; an IP-literal
        host is checked against the address rules here (it never reaches the resolver)."""
        if url.scheme not in _SCHEMES:
            raise FetchRefused(f"only http and https URLs are fetched, not {url.scheme or 'a relative URL'!r}",
                               reason="scheme")
        host = (url.raw_host or "").lower().rstrip(".")
        if not host:
            raise FetchRefused(f"{url} has no host", reason="host")
        if url.raw_user is not None or url.raw_password is not None:
            raise FetchRefused("URLs with credentials are not fetched", reason="host")
        port = url.port if url.port is not None else _SCHEMES[url.scheme]
        if not self._allowed(host, port, _SCHEMES[url.scheme]):
            shown = f"[{host}]" if ":" in host else host
            raise FetchRefused(f"host {shown}:{port} is not in [inputs] url_allow", reason="host")
        try:
            literal = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return
        refusal = address_refusal(literal, self.allow_networks)
        if refusal is not None:
            raise FetchRefused(f"{host}: {refusal}", reason="address")

    def _allowed(self, host: str, port: int, default_port: int) -> bool:
        for pattern, allowed_port in self.patterns:
            if (allowed_port if allowed_port is not None else default_port) != port:
                continue
            if pattern.startswith("*."):
                if host.endswith(pattern[1:]) and len(host) > len(pattern) - 1:
                    return True
            elif host == pattern or _same_address(host, pattern):
                return True
        return False


def _same_address(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return False


class GuardedResolver(AbstractResolver):
    """Resolves through ``inner`` (aiohttp's threaded resolver by default) and refuses the whole name
    when any of its addresses is refused by ``allow_networks``' policy."""

    def __init__(self, allow_networks: Iterable[IPNetwork] = (), inner: AbstractResolver | None = None) -> None:
        self.allow_networks = tuple(allow_networks)
        self._inner = inner  # aiohttp's default is made on first use: it needs the running loop

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
                      ) -> list[ResolveResult]:
        if self._inner is None:
            self._inner = aiohttp.ThreadedResolver()
        results = await self._inner.resolve(host, port, family)
        for result in results:
            refusal = address_refusal(result["host"], self.allow_networks)
            if refusal is not None:
                log.warning("refused to connect to %s: %s", host, refusal)
                raise _AddressRefused(FetchRefused(f"{host} resolves to {refusal}", reason="address"))
        return results

    async def close(self) -> None:
        if self._inner is not None:
            await self._inner.close()


@dataclass(frozen=True)
class Fetched:
    """A fetched body, the URL it finally came from and its declared content type."""

    url: str
    data: bytes = field(repr=False)
    content_type: str


class Fetcher:
    """One session for every URL input, over a ``GuardedResolver``; close it with ``close()``."""

    def __init__(self, policy: FetchPolicy, *, max_bytes: int, timeout_s: float, max_redirects: int = 5,
                 resolver: AbstractResolver | None = None) -> None:
        self.policy, self.max_bytes, self.timeout_s, self.max_redirects = policy, max_bytes, timeout_s, max_redirects
        self._resolver = GuardedResolver(policy.allow_networks, resolver)
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(resolver=self._resolver, limit=16, use_dns_cache=False)
            self._session = aiohttp.ClientSession(
                connector=connector, trust_env=False, cookie_jar=aiohttp.DummyCookieJar(),
                headers={"User-Agent": "comfy-orchestrator (input fetch)"},
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def fetch(self, url: str) -> Fetched:
        """The body at ``url`` after at most ``max_redirects`` redirects, each hop checked."""
        try:
            current = URL(url)
        except (ValueError, TypeError):
            raise FetchRefused(f"not a URL: {url[:200]!r}", reason="url") from None
        try:
            async with asyncio.timeout(self.timeout_s):
                for _hop in range(self.max_redirects + 1):
                    self.policy.check_url(current)
                    async with self._request(current) as resp:
                        if resp.status in _REDIRECTS:
                            location = resp.headers.get("Location")
                            if not location:
                                raise FetchFailed(f"{current} redirected ({resp.status}) without a Location")
                            try:
                                current = current.join(URL(location))
                            except (ValueError, TypeError):
                                raise FetchFailed(f"{current} redirected to an invalid URL") from None
                            continue
                        if not 200 <= resp.status < 300:
                            raise FetchFailed(f"{current} answered {resp.status}")
                        data = await self._body(resp, current)
                        return Fetched(str(current), data, resp.headers.get("Content-Type", ""))
                raise FetchFailed(f"more than {self.max_redirects} redirects, the last to {current}")
        except TimeoutError:
            raise FetchFailed(f"fetching {current} took longer than {self.timeout_s:g}s") from None

    @asynccontextmanager
    async def _request(self, url: URL) -> AsyncIterator[aiohttp.ClientResponse]:
        try:
            async with self._open().get(url, allow_redirects=False) as resp:
                yield resp
        except aiohttp.ClientConnectorError as exc:
            refused = _refusal_in(exc)
            if refused is not None:
                raise refused from None
            raise FetchFailed(f"cannot connect to {url.host}: {exc.os_error or exc}") from None
        except aiohttp.ClientError as exc:
            raise FetchFailed(f"fetching {url} failed: {exc}") from None

    async def _body(self, resp: aiohttp.ClientResponse, url: URL) -> bytes:
        if resp.content_length is not None and resp.content_length > self.max_bytes:
            raise FetchTooLarge(f"{url} is {resp.content_length} bytes; at most {self.max_bytes} are allowed")
        chunks: list[bytes] = []
        size = 0
        async for chunk in resp.content.iter_chunked(_CHUNK):
            size += len(chunk)
            if size > self.max_bytes:
                raise FetchTooLarge(f"{url} is over {self.max_bytes} bytes, the most allowed")
            chunks.append(chunk)
        return b"".join(chunks)


def _refusal_in(exc: BaseException) -> FetchRefused | None:
    seen: Any = exc
    for _ in range(5):
        if isinstance(seen, _AddressRefused):
            return seen.refusal
        nested = getattr(seen, "os_error", None) or seen.__cause__
        if nested is None or nested is seen:
            return None
        seen = nested
    return None
