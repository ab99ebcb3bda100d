"""Delivery: one owner per attempt (owner.py) and the pure rule from outcome to next state (transition.py)."""
