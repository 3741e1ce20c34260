"""Integrations of mailstrom with frameworks (each imported only when used)."""
