"""Artifacts: content-addressed records (plans, transcripts, logs...) stored on disk."""
