"""Nightjar tflite_export (see README)."""
