"""Upstream providers, one package each (dmds/, dengage/) with its registry entry (its spec.py); base.py is
the contract a provider meets, spec.py what an entry holds, registry.py lists the entries and builds the
providers, sandbox.py is the sandbox server their routes join."""
