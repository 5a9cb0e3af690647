"""The outbound policy gate: may this ref, or this URL, be fetched? Plain Python, no I/O.

Called twice: once when provisioning is asked for (so a refusal answers at once, before a
task starts), and again before every network request the fetch makes, redirects included.
Rules: downloads can be switched off; a ref's scheme must be allowed; every host reached must
match ``allowed_hosts`` when that list is not empty; plain ``http`` only ever reaches loopback
hosts, and an https fetch is never redirected to plain http.
"""

from __future__ import annotations

import ipaddress
from typing import Optional, Protocol, Sequence
from urllib.parse import urlsplit

from orch.core.model_ref import ModelRef
from orch.provision.errors import OutboundRefused, ProvisionUnsupported

DEFAULT_HF_ENDPOINT = "https://huggingface.co"
POLICY_KEY = "catalog.outbound"


class Policy(Protocol):
    allow_downloads: bool
    allowed_hosts: Sequence[str]
    allowed_schemes: Sequence[str]


def is_loopback_host(host: str) -> bool:
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_allowed(host: str, allowed: Sequence[str]) -> bool:
    """Empty list: any host. Otherwise an exact name or IP, or ``*.domain`` for its subdomains."""
    if not allowed:
        return True
    host = host.strip("[]").lower().rstrip(".")
    for pattern in allowed:
        if pattern.startswith("*."):
            if host.endswith(pattern[1:]) and host != pattern[2:]:
                return True
            continue
        if host == pattern:
            return True
        try:
            if ipaddress.ip_address(host) == ipaddress.ip_address(pattern):
                return True
        except ValueError:
            pass
    return False


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
    (ProvisionUnsupported). Local refs always pass: they fetch nothing."""
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
    """Refuse one network request the policy forbids; ``came_from`` is the URL that
    redirected here, if any."""
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
    if scheme == "http" and not is_loopback_host(host):
        raise OutboundRefused(f"refused {url}: plain http is used only toward loopback hosts; use https")
    if came_from is not None and urlsplit(came_from).scheme.lower() == "https" and scheme == "http":
        raise OutboundRefused(f"refused the redirect from {came_from} to {url}: it downgrades https to http")
    if not host_allowed(host, policy.allowed_hosts):
        raise OutboundRefused(
            f"refused {url}: host '{host}' is not in {POLICY_KEY}.allowed_hosts "
            f"({', '.join(policy.allowed_hosts)}); add it (or *.{'.'.join(host.split('.')[-2:])}) to allow it"
        )
