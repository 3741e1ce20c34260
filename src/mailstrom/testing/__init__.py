"""Testing programs that send mail through mailstrom.

:mod:`mailstrom.testing.dns` and :mod:`mailstrom.testing.smtp` are real DNS and SMTP
servers on loopback for tests; they need the ``testing`` extra
(``pip install 'mailstrom[testing]'``).
"""
