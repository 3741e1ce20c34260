"""mailstrom.policy."""
