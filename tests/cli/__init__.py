"""Tests of the mailstrom command line."""
