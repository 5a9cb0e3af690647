"""The ``catalog`` section: where models and engines are kept, and what provisioning may
fetch from the network (the outbound policy)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from pydantic import Field, field_validator

from orch.config.base import Strict
from orch.core import net

#: Schemes the outbound policy can allow (the ref forms that fetch over the network).
FETCH_SCHEMES = ("hf", "https", "http", "s3", "oci")


class OutboundPolicy(Strict):
    """What model provisioning may fetch from the network."""

    #: Off: every ref that needs a download is refused at once; local files still work.
    allow_downloads: bool = True
    #: Hosts downloads may reach: ``example.com``, ``*.example.com`` for its subdomains, an
    #: address, or a CIDR (``10.0.0.0/8``: any host whose addresses all lie in it); empty: any
    #: public host. Hub downloads redirect to CDN hosts, which must be listed too. Loopback,
    #: link-local, private, unspecified, multicast and broadcast addresses are refused unless
    #: an entry names the host or holds its address (a private mirror).
    allowed_hosts: list[str] = Field(default_factory=list, max_length=256)
    #: Ref schemes that may be fetched. Plain ``http`` only ever reaches loopback hosts.
    allowed_schemes: list[str] = Field(default_factory=lambda: list(FETCH_SCHEMES), min_length=1)
    #: Seconds any single network operation may take: a connect, or a read that gets no byte.
    timeout_s: float = Field(default=30, gt=0, le=600)
    #: PEM bundle of the CAs trusted for https downloads (a private mirror); none: the system's.
    ca_bundle: Optional[str] = None

    @field_validator("allowed_hosts")
    @classmethod
    def _host_patterns(cls, value: list[str]) -> list[str]:
        name = re.compile(r"^(\*\.)?[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$")
        out = []
        for host in value:
            lowered = host.strip().lower()
            if not name.match(lowered) and net.ip_of(lowered) is None and isinstance(net.parse_allowed(lowered), str):
                raise ValueError(f"allowed host {host!r} must be a host name, *.domain, an IP address or a CIDR "
                                 "such as 10.0.0.0/8 (no scheme, port or path)")
            out.append(lowered)
        return out

    @field_validator("allowed_schemes")
    @classmethod
    def _known_schemes(cls, value: list[str]) -> list[str]:
        for scheme in value:
            if scheme not in FETCH_SCHEMES:
                raise ValueError(f"scheme {scheme!r} is not a fetch scheme; choose from {', '.join(FETCH_SCHEMES)}")
        return value

    @field_validator("ca_bundle")
    @classmethod
    def _absolute_bundle(cls, value: Optional[str]) -> Optional[str]:
        return None if value is None else str(Path(value).expanduser().resolve())


class CatalogConfig(Strict):
    #: Where the catalog's records and index live; relative paths are taken from the
    #: directory the service is started in (like ``artifacts.root``).
    root: str = Field(default=".runtime/catalog", validate_default=True, min_length=1)
    #: Where downloaded models are cached on each node that provisions one.
    model_cache: str = Field(default=".runtime/models", validate_default=True, min_length=1)
    outbound: OutboundPolicy = OutboundPolicy()
    #: The Hugging Face Hub endpoint for ``hf:`` refs (a mirror); none: huggingface-hub's
    #: own default, which honours ``HF_ENDPOINT``.
    hf_endpoint: Optional[str] = Field(default=None, pattern=r"^https?://[^\s/?#]+(/[^\s?#]*)?$")
    #: Longest a provisioning request waits for its download before answering.
    provision_timeout_s: float = Field(default=3600, gt=0, le=7 * 24 * 3600)
    #: A task for a pool that waits for its model starts the model's fetch (when the outbound
    #: policy allows it); off: only POST /v2/catalog/models or a handoff provides the model.
    fetch_on_demand: bool = True
    #: Where provisioned engines (downloaded binaries, source builds) are kept on each node.
    engine_cache: str = Field(default=".runtime/engine-cache", validate_default=True, min_length=1)
    #: Watched directory of handoff files (JSON; see orch/catalog/handoff_files.py).
    handoff_dir: str = Field(default=".runtime/engines", validate_default=True, min_length=1)
    #: Directories local model files (``file:`` refs, a handoff's ``model_path`` or
    #: ``binary_path``) must lie under, symlinks resolved; anything else is refused (403).
    #: Unset: the model cache and the directories of the pools' own local model refs.
    local_roots: Optional[list[str]] = Field(default=None, max_length=256)

    @field_validator("root", "model_cache", "engine_cache", "handoff_dir")
    @classmethod
    def _absolute(cls, value: str) -> str:
        return str(Path(value).expanduser().resolve())

    @field_validator("local_roots")
    @classmethod
    def _absolute_roots(cls, value: Optional[list[str]]) -> Optional[list[str]]:
        if value is not None and not all(root.strip() for root in value):
            raise ValueError("a local root must be a directory path, not empty")
        return None if value is None else [str(Path(root).expanduser().resolve()) for root in value]
