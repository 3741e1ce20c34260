"""An email backend module that fails when imported, as one can that needs a service at
import time: the system check of mailstrom must not fail on it (a test of apps.py)."""

raise RuntimeError("the mail service this backend connects to at import is not there")
