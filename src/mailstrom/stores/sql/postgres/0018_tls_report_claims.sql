-- mailstrom PostgreSQL schema, version 18: TLS reports POSTed, claimed in the store.
--
-- mailstrom tlsrpt --send recorded what it had POSTed in its --out directory only, one
-- host's: every host of a shared store running the daily timer POSTed the day's report
-- to each https: rua URI again, each copy with its own report id. A run now takes the
-- report's key (its day, policy domain and URI) here first, and POSTs only when no
-- other run holds it: while the POSTs may last, then for idempotency_window after a
-- success; a failed POST lets it go.
CREATE TABLE tls_report_claims (
    key    text PRIMARY KEY,
    until  timestamptz NOT NULL
);
