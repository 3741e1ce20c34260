"""``mailstrom web``: a dashboard of the queue in the browser (the ``web`` extra).

>>> from mailstrom.web import create_app
>>> app = create_app(store, token="s3cret")  # doctest: +SKIP
"""

from mailstrom.web.app import create_app

__all__ = ["create_app"]
