"""Network addresses: the one loopback test, the classes of address an outbound fetch never
reaches unless told to, and matching against an allow-list of names and CIDRs.

Plain Python; ``resolve`` is the only function that touches the network (a DNS lookup), and
callers that must not (tests) pass their own resolver.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Callable, Iterable, Optional, Sequence, Union

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
#: ``resolver(host, port) -> addresses``: every address the name resolves to, as strings.
Resolver = Callable[[str, int], Sequence[str]]

#: Address classes refused by default, in the order they are tested (the first match names
#: the rule in an error message).
_PRIVATE = tuple(ipaddress.ip_network(net) for net in (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7", "0.0.0.0/8",
))
_BROADCAST = ipaddress.ip_address("255.255.255.255")
RULE = ("outbound fetches never reach loopback, link-local, private, unspecified, multicast or broadcast "
        "addresses")


def bare_host(host: str) -> str:
    """``host`` without IPv6 brackets or a trailing dot, lowercased."""
    return host.strip().strip("[]").rstrip(".").lower()


def ip_of(host: str) -> Optional[IPAddress]:
    """The address ``host`` spells (``10.0.0.1``, ``[::1]``, ``fe80::1%eth0``), or None for a name."""
    text = bare_host(host).split("%", 1)[0]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _unmapped(address: IPAddress) -> IPAddress:
    """An IPv4 address carried in IPv6 (``::ffff:10.0.0.1``) is judged as the IPv4 one."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback address (127.0.0.0/8, ::1, and IPv4-mapped forms)."""
    if bare_host(host) == "localhost":
        return True
    address = ip_of(host)
    return address is not None and _unmapped(address).is_loopback


def address_class(address: Union[str, IPAddress]) -> Optional[str]:
    """The class of a non-public address (``loopback``, ``link-local``, ``private``,
    ``unspecified``, ``multicast``, ``broadcast``, ``reserved``), or None for a public one."""
    if isinstance(address, str):
        parsed = ip_of(address)
        if parsed is None:
            raise ValueError(f"{address!r} is not an IP address")
        address = parsed
    address = _unmapped(address)
    checks = (
        ("unspecified", address.is_unspecified),
        ("loopback", address.is_loopback),
        ("link-local", address.is_link_local),
        ("multicast", address.is_multicast),
        ("broadcast", address == _BROADCAST),
        ("private", any(address in net for net in _PRIVATE if net.version == address.version)),
    )
    for name, hit in checks:
        if hit:
            return name
    return None if address.is_global else "reserved"


def parse_allowed(entry: str) -> Union[str, IPNetwork]:
    """One allow-list entry: a CIDR (``10.0.0.0/8``, ``10.1.2.3/32``) as a network; a name,
    ``*.domain`` or a bare address as text (they name a host as it is written)."""
    text = bare_host(entry)
    if "/" in text:
        try:
            return ipaddress.ip_network(text, strict=False)
        except ValueError:
            pass
    return text


def name_listed(host: str, allowed: Iterable[str]) -> bool:
    """``host`` is named by an entry: the same name or address, or a subdomain of ``*.domain``."""
    host = bare_host(host)
    address = ip_of(host)
    for entry in allowed:
        pattern = parse_allowed(entry)
        if not isinstance(pattern, str):
            continue
        if pattern.startswith("*."):
            if host.endswith(pattern[1:]) and host != pattern[2:]:
                return True
        elif host == pattern or (address is not None and address == ip_of(pattern)):
            return True
    return False


def address_listed(address: Union[str, IPAddress], allowed: Iterable[str]) -> bool:
    """``address`` lies in a CIDR entry."""
    parsed = ip_of(address) if isinstance(address, str) else address
    if parsed is None:
        return False
    parsed = _unmapped(parsed)
    for entry in allowed:
        pattern = parse_allowed(entry)
        if not isinstance(pattern, str) and pattern.version == parsed.version and parsed in pattern:
            return True
    return False


def has_networks(allowed: Iterable[str]) -> bool:
    """Some entry is a CIDR (so a name may still pass by the addresses it resolves to)."""
    return any(not isinstance(parse_allowed(entry), str) for entry in allowed)


def resolve(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to for a TCP connection, in the resolver's order."""
    literal = ip_of(host)
    if literal is not None:
        return [str(literal)]
    infos = socket.getaddrinfo(bare_host(host), port, type=socket.SOCK_STREAM)
    seen: list[str] = []
    for family, _, _, _, sockaddr in infos:
        if family in (socket.AF_INET, socket.AF_INET6) and sockaddr[0] not in seen:
            seen.append(str(sockaddr[0]))
    return seen
