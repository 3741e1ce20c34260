"""mailstrom.cli."""
