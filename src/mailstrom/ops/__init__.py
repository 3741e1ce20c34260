"""Operating a worker from outside: Prometheus metrics and a health check over HTTP
(:mod:`mailstrom.ops.server`, :mod:`mailstrom.ops.exporter`).

Imported only when used; the exporter needs the ``metrics`` extra (prometheus-client).
"""
