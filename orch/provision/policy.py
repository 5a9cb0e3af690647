"""The outbound policy gate: may this ref, this URL, this address be fetched from?

Called when provisioning is asked for (so a refusal answers at once, before a task starts),
before every network request the fetch makes, redirects included (``check_url``), and when
each connection is opened (``checked_addresses``): the host is resolved there, every address
it resolves to is judged, and the connection goes to a judged address, so a name that
resolves differently the second time (DNS rebinding) cannot reach anything else.

Rules: downloads can be switched off; a ref's scheme must be allowed; a host must match
``allowed_hosts`` when that list is not empty (a name, ``*.domain``, an address or a CIDR);
loopback, link-local, private, unspecified, multicast and broadcast addresses are refused
unless ``allowed_hosts`` names the host or holds the address; plain ``http`` only ever
reaches loopback hosts, and an https fetch is never redirected to plain http. Plain Python.
"""

from __future__ import annotations

from typing import Optional, Protocol, Sequence
from urllib.parse import urlsplit

from orch.core import net
from orch.core.model_ref import ModelRef
from orch.provision.errors import OutboundRefused, ProvisionUnsupported

DEFAULT_HF_ENDPOINT = "https://huggingface.co"
POLICY_KEY = "catalog.outbound"
HOSTS_KEY = f"{POLICY_KEY}.allowed_hosts"


class Policy(Protocol):
    allow_downloads: bool
    allowed_hosts: Sequence[str]
    allowed_schemes: Sequence[str]


def host_allowed(host: str, allowed: Sequence[str]) -> bool:
    """Empty list: any host. Otherwise the host is named by an entry (a name, ``*.domain``
    or an address); a CIDR entry admits a name only by what it resolves to (see
    ``checked_addresses``), an address by itself."""
    if not allowed:
        return True
    return net.name_listed(host, allowed) or net.address_listed(host, allowed)


def unsupported_reason(ref: ModelRef) -> Optional[str]:
    """Why a parsed ref cannot be provisioned by this release (None: it can)."""
    if ref.scheme == "s3":
        return (f"not supported yet: s3:// provisioning ({ref.raw}); copy the object to the node "
                f"(aws s3 cp s3://{ref.repo}/{ref.path} /models/) and register it as file:/models/..., "
                "or serve it over a presigned https:// URL")
    if ref.scheme == "oci":
        return (f"not supported yet: oci:// provisioning ({ref.raw}); pull the artifact on the node "
                "(oras pull ...) and register the file as file:/abs/path")
    return None


def check_ref(ref: ModelRef, policy: Policy, hf_endpoint: Optional[str] = None) -> None:
    """Refuse a ref the policy forbids (OutboundRefused) or this release cannot fetch
    (ProvisionUnsupported). Local refs pass here: they fetch nothing (their paths are judged
    against ``catalog.local_roots`` elsewhere)."""
    if ref.is_local:
        return
    reason = unsupported_reason(ref)
    if reason:
        raise ProvisionUnsupported(reason)
    if not policy.allow_downloads:
        raise OutboundRefused(
            f"model ref {ref.raw!r} needs a download and downloads are disabled ({POLICY_KEY}.allow_downloads: "
            "false); copy the model to the node and register it as file:/abs/path, or enable downloads"
        )
    if ref.scheme not in policy.allowed_schemes:
        raise OutboundRefused(
            f"model ref {ref.raw!r}: scheme '{ref.scheme}' is not in {POLICY_KEY}.allowed_schemes "
            f"({', '.join(policy.allowed_schemes)})"
        )
    url = (hf_endpoint or DEFAULT_HF_ENDPOINT) if ref.scheme == "hf" else ref.url
    check_url(url or "", policy)


def check_url(url: str, policy: Policy, came_from: Optional[str] = None) -> None:
    """Refuse one network request the policy forbids by its URL alone; ``came_from`` is the URL
    that redirected here, if any. A host given as an address is judged here too."""
    if not policy.allow_downloads:
        raise OutboundRefused(f"downloads are disabled ({POLICY_KEY}.allow_downloads: false); refused {url}")
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
    except ValueError:
        raise OutboundRefused(f"refused {url!r}: not a valid URL") from None
    scheme = parts.scheme.lower()
    if scheme not in ("https", "http") or not host:
        raise OutboundRefused(f"refused {url!r}: only https:// (and http:// to loopback) requests are made")
    if scheme == "http" and not net.is_loopback(host):
        raise OutboundRefused(f"refused {url}: plain http is used only toward loopback hosts; use https")
    if came_from is not None and urlsplit(came_from).scheme.lower() == "https" and scheme == "http":
        raise OutboundRefused(f"refused the redirect from {came_from} to {url}: it downgrades https to http")
    allowed = policy.allowed_hosts
    if allowed and not host_allowed(host, allowed) and not (net.ip_of(host) is None and net.has_networks(allowed)):
        raise OutboundRefused(_not_listed(url, host, allowed))
    literal = "127.0.0.1" if net.bare_host(host) == "localhost" else host
    if net.ip_of(literal) is not None:
        _judge(url, host, literal, policy)


def checked_addresses(host: str, port: int, policy: Policy, resolver: Optional[net.Resolver] = None,
                      what: Optional[str] = None) -> list[str]:
    """Resolve ``host`` and judge every address it resolves to; returns them (connect to
    these, never to the name). Refuses the whole host if any address is refused, so the
    answer cannot depend on which address a resolver happens to put first."""
    what = what or f"{host}:{port}"
    literal = net.ip_of(host)
    try:
        addresses = [str(literal)] if literal is not None else list((resolver or net.resolve)(host, port))
    except OSError as exc:
        raise OSError(f"{host} could not be resolved ({exc})") from None
    if not addresses:
        raise OSError(f"{host} resolves to no address")
    for address in addresses:
        _judge(what, host, address, policy)
    return addresses


def _judge(what: str, host: str, address: str, policy: Policy) -> None:
    allowed = policy.allowed_hosts
    listed = net.name_listed(host, allowed) or net.address_listed(address, allowed)
    if allowed and not listed:
        raise OutboundRefused(_not_listed(what, host, allowed, address))
    kind = net.address_class(address)
    if kind is not None and not listed:
        spelled = "is" if net.ip_of(host) is not None else f"resolves to {address}, which is"
        cidr = f"{address}/{32 if ':' not in address else 128}"
        raise OutboundRefused(
            f"refused {what}: {net.bare_host(host)} {spelled} a {kind} address; {net.RULE} unless {HOSTS_KEY} "
            f"lists the host or a CIDR holding the address (for a private mirror add '{net.bare_host(host)}' "
            f"or '{cidr}')"
        )


def _not_listed(what: str, host: str, allowed: Sequence[str], address: Optional[str] = None) -> str:
    host = net.bare_host(host)
    suffix = f" (it resolves to {address})" if address and address != host else ""
    judged = address or (host if net.ip_of(host) is not None else None)
    kind = net.address_class(judged) if judged else None
    if kind:
        suffix += f", a {kind} address,"
    hint = f"add it (or *.{'.'.join(host.split('.')[-2:])})" if net.ip_of(host) is None else "add it (or a CIDR holding it)"
    return (f"refused {what}: host '{host}'{suffix} is not in {HOSTS_KEY} ({', '.join(allowed)}); "
            f"{hint} to allow it")
