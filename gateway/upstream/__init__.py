"""Upstream email-platform drivers: the only package that speaks HTTP."""
