"""Tenants: API keys (a sqlite store of salted hashes behind a detached actor), the
per-replica key cache the auth middleware resolves bearers with, and access checks."""
