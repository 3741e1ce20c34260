"""mailstrom.message."""
