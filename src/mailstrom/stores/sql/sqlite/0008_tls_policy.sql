-- mailstrom SQLite schema, version 8: outbound TLS policy.
--
-- tls_broken remembers MX hosts whose TLS handshake failed, until a time, so that every
-- worker sharing the store goes straight to plaintext with them under the opportunistic
-- policy (one connection per attempt instead of two) until the entry expires.
CREATE TABLE tls_broken (
    host      TEXT PRIMARY KEY,
    until     INTEGER NOT NULL,
    reason    TEXT NOT NULL,
    noted_at  INTEGER NOT NULL
);

-- Expired entries are found without a scan.
CREATE INDEX tls_broken_until ON tls_broken (until);

-- The TLS policy an attempt's connection was made under (none, opportunistic, required,
-- verify, dane, mta-sts enforce|testing); NULL before version 8 and when no connection
-- was decided on.
ALTER TABLE attempts ADD COLUMN tls_policy TEXT;

-- REQUIRETLS (RFC 8689): the message may only go over TLS to an authenticated server that
-- offers REQUIRETLS; it is sent on MAIL FROM.
ALTER TABLE messages ADD COLUMN require_tls INTEGER NOT NULL DEFAULT 0;
