"""Typed provisioning failures, each mapped to a stable API error code.

Every class takes one message argument, so an instance survives pickling across Ray
(``ray.get`` re-raises it as the same type).
"""

from __future__ import annotations

from orch.api.errors import ErrorCode
from orch.core.errors import OrchError


class ProvisionError(Exception):
    """A model could not be provisioned; ``code`` says how the API answers it."""

    code = ErrorCode.INTERNAL
    retriable = False

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.__class__.__name__

    def to_orch_error(self) -> OrchError:
        return OrchError(self.code, self.message, retriable=self.retriable,
                         retry_after_ms=5000 if self.retriable else None)


class OutboundRefused(ProvisionError):
    """The outbound policy forbids this fetch; refused before any network call."""

    code = ErrorCode.INVALID_PARAMS


class LocalPathRefused(ProvisionError):
    """A local path (a ``file:`` ref, a handoff's model or binary) outside
    ``catalog.local_roots``; nothing is read or recorded."""

    code = ErrorCode.FORBIDDEN


class ProvisionUnsupported(ProvisionError):
    """The ref parses but this release cannot provision it."""

    code = ErrorCode.INVALID_PARAMS


class SourceNotFound(ProvisionError):
    """The ref points at nothing (no such file, upstream 404, unknown repository)."""

    code = ErrorCode.INVALID_PARAMS


class DigestMismatch(ProvisionError):
    """The content's sha256 is not the one asked for; the bad file is already removed."""

    code = ErrorCode.INVALID_PARAMS


class FetchFailed(ProvisionError):
    """The network or the upstream failed (timeout, reset, 5xx); a retry may succeed and
    resumes a partial download."""

    code = ErrorCode.POOL_UNAVAILABLE
    retriable = True


class TLSFailed(ProvisionError):
    """The server's certificate was not trusted; retrying will not help until the CA is."""

    code = ErrorCode.INVALID_PARAMS


class InvalidRequest(ProvisionError):
    """A provisioning request with a malformed field (model id, digest)."""

    code = ErrorCode.INVALID_PARAMS


class BadModelFile(ProvisionError):
    """The fetched file is not a readable model (a corrupt GGUF header); it was removed."""

    code = ErrorCode.INVALID_PARAMS


class ToolMissing(ProvisionError):
    """A program the plan needs is not on the node; the message names it and how to get it."""

    code = ErrorCode.INVALID_PARAMS


class BuildFailed(ProvisionError):
    """A step that runs a program (git, cmake, the built binary) failed; the message carries
    the end of its output."""

    code = ErrorCode.INTERNAL


class EngineUnreachable(ProvisionError):
    """An external engine did not answer as an OpenAI-compatible server should."""

    code = ErrorCode.POOL_UNAVAILABLE
    retriable = True
