"""mailstrom.routing."""
