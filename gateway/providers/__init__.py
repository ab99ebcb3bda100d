"""Upstream providers, one package each (dmds/, dengage/); base.py is the contract, registry.py builds them."""
