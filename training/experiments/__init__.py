"""Experiments that exercise the whole StateX pipeline end to end."""
