"""Who may start a session, and who a request comes from: invites, open sessions, proxies, the cookie.

- Invite-only is the default: a session starts only with a one-time invite code
  (`POST /admin/invites`). `open=True` (`serve --open`) also lets anyone start one, at most
  `per_address` sessions per client address in any `window_s` seconds; an invite is honoured
  either way and never counts against the limit. The count is kept in the database (the rater
  rows' hashed address and start time), so every server process sharing it enforces one limit,
  and it is taken while the study's row is locked by the session start, so concurrent starts from
  one address cannot all slip under it.
- The client address is the TCP peer's, unless that peer is a trusted proxy
  (`trusted_proxies`: networks in CIDR notation, `serve --trusted-proxy`): then X-Forwarded-For
  is read from the right — each proxy appends the address it received the request from — skipping
  trusted proxies, and the first address that is not a trusted proxy is the client. Entries to
  the left of it were written by the client and are ignored, so a rater cannot choose their
  address by sending the header. Without trusted proxies the headers are ignored (a study behind a
  proxy that is not declared sees every rater as the proxy: the limit then holds for all raters
  together — it fails closed). IPv6 clients are counted per /64 network (one host usually holds
  a whole /64); the database keeps a SHA-256 of study id + address, not the address.
- The session cookie is `Secure` when `secure=True` (`serve --secure`: the study is reached over
  https through a TLS proxy), when the request itself came over https, or when a trusted proxy
  says so (X-Forwarded-Proto, its last value, is `https`). uvicorn's own proxy-header handling is
  turned off (`app.serve`), so these rules are the only ones.
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass
from functools import cached_property

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Access:
    """How sessions start and how requests are attributed (module docstring)."""

    open: bool = False
    per_address: int = 3
    window_s: float = 24 * 3600.0
    trusted_proxies: tuple[str, ...] = ()
    secure: bool = False

    def __post_init__(self) -> None:
        if self.per_address < 1:
            raise ValueError(f"--per-address {self.per_address}: allow at least one session per address")
        if self.window_s <= 0:
            raise ValueError("the per-address window must be positive")
        for network in self.trusted_proxies:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                raise ValueError(f"--trusted-proxy {network!r}: not an IP address or CIDR network") from None

    @cached_property
    def networks(self) -> tuple[Network, ...]:
        return tuple(ipaddress.ip_network(n, strict=False) for n in self.trusted_proxies)

    def trusted(self, address: Address | None) -> bool:
        return address is not None and any(address in network for network in self.networks)

    def client_address(self, peer: str | None, forwarded_for: list[str]) -> str:
        """The address a request is counted against (module docstring); "unknown" without a peer."""
        current = parse_address(peer or "")
        if current is None:
            return peer or "unknown"
        if self.trusted(current):
            hops = [part for header in forwarded_for for part in header.split(",")]
            for hop in reversed(hops):
                address = parse_address(hop)
                if address is None:  # garbage where a proxy should have written an address: stop
                    break
                current = address
                if not self.trusted(address):
                    break
        return counted(current)

    def https(self, scheme: str, peer: str | None, forwarded_proto: list[str]) -> bool:
        """Whether the client reached the study over https (direct, or as a trusted proxy says)."""
        if scheme == "https":
            return True
        if not forwarded_proto or not self.trusted(parse_address(peer or "")):
            return False
        values = [part.strip().lower() for header in forwarded_proto for part in header.split(",")]
        return bool(values) and values[-1] == "https"

    def cookie_secure(self, scheme: str, peer: str | None, forwarded_proto: list[str]) -> bool:
        return self.secure or self.https(scheme, peer, forwarded_proto)


def parse_address(text: str) -> Address | None:
    """An IP address from a header entry: "1.2.3.4", "1.2.3.4:5678", "2001:db8::1", "[2001:db8::1]:443"."""
    text = text.strip().strip('"')
    if text.startswith("["):
        text = text[1:].split("]", 1)[0]
    elif text.count(":") == 1:  # IPv4 with a port
        text = text.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def counted(address: Address) -> str:
    """What the limit counts: the IPv4 address, or the IPv6 /64 network."""
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


def address_digest(study_id: str, address: str) -> str:
    return hashlib.sha256(f"{study_id}\n{address}".encode()).hexdigest()
