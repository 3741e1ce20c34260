"""mailstrom.smtp."""
