"""Fault tests: the node broken on purpose (see conftest.py and docs/RELIABILITY.md)."""
