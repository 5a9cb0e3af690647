"""The ingress's routes, one module per area; each exposes ``routes(state) -> list[ApiRoute]``."""
