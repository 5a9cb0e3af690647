"""Ingress-side series: each replica's deltas add up in the shared totals."""

from __future__ import annotations

from orch.observability.exposition import render
from orch.observability.ingress_metrics import IngressCounters, merge


def test_catalog_verifications_are_counted_across_replicas_and_exposed():
    one, two = IngressCounters(), IngressCounters()
    one.verified("ok")
    one.verified("ok")
    two.verified("mismatch")
    totals = merge(merge({}, one.take_deltas()), two.take_deltas())
    assert totals["verifications"] == {"ok": 2, "mismatch": 1}
    assert one.take_deltas() is None  # taken once
    text = render({}, {}, totals, totals["verifications"]).decode()
    assert 'catalog_verifications_total{result="ok"} 2.0' in text
    assert 'catalog_verifications_total{result="mismatch"} 1.0' in text
