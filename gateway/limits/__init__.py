"""Limits on what clients may take: per-IP sessions, AUTH failure throttling and login rates (clients.py),
and the bytes of large messages held at once (budget.py)."""
