"""Provisioning: plan a model ref's fetch (``models``) or an engine's installation
(``engines``; carried out by ``engine_run``), run it as a Ray task on the target node
(``tasks``), and record the result in the catalog (a model record, or a handoff record the
pools bind to). The outbound policy (``policy``) judges every URL and every address a fetch
connects to (``connect``); ``fetch_url`` and ``fetch_hf`` fetch, ``files`` digests, inspects
and removes. All but ``tasks`` are plain Python; ``tasks`` is the Ray shell."""
