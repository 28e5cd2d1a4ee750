"""Kerrighed in user space: a single-system-image Linux cluster built from node daemons."""
