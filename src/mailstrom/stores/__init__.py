"""mailstrom.stores."""
