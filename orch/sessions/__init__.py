"""Sessions shared by every ingress replica: the ``orch-sessions`` actor (the logic itself
is ``orch.core.sessions``; the ingress's side is ``orch.serve.sessions_gate``)."""
