"""Model provisioning: plan a ref's fetch, run it as a Ray task on the target node, record
the result in the catalog. ``errors``, ``policy`` and ``models`` are plain Python; ``tasks``
is the Ray shell."""
