"""The writer service."""
