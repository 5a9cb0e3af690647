"""Sessions shared by every ingress replica: the ``orch-sessions`` actor and the gate the
ingress admits tasks through (the logic itself is ``orch.core.sessions``)."""
