"""Upstream providers, one package each (dmds/, dengage/); base.py is the contract, registry.py builds them."""

# gateway.config.settings imports every provider's config model, and those import gateway.config.base:
# loading gateway.config first keeps that cycle in order whichever module is imported first.
import gateway.config  # noqa: F401
