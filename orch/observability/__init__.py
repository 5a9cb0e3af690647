"""Metrics and logs: what operators look at."""
