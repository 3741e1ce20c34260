"""mailstrom.runtime."""
