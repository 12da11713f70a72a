"""Nightjar server (see README)."""
