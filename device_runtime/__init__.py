"""Nightjar device_runtime (see README)."""
