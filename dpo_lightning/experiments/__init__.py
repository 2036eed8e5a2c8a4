"""Experiments that ship with the library (the controlled-sentiment frontier)."""
