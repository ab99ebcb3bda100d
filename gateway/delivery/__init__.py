"""Delivery: one owner per attempt (owner.py), the pure rule from outcome to next state (transition.py), the
retry worker that hands queued messages to the owner (worker.py), account health and idempotency keys."""
