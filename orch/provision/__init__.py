"""Provisioning: plan a model ref's fetch (``models``) or an engine's installation
(``engines``), run it as a Ray task on the target node (``tasks``), and record the result in
the catalog (a model record, or a handoff record the pools bind to). ``errors``, ``policy``,
``models`` and ``engines`` are plain Python; ``tasks`` is the Ray shell."""
