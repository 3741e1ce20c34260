-- mailstrom SQLite schema, version 9: MTA-STS policies (RFC 8461) cached for every worker,
-- and the TLS sessions counted for TLS reports (RFC 8460).

-- One row per recipient domain whose policy was fetched: replaced when the _mta-sts TXT
-- id changes or the policy ages out; kept when a refresh fails.
CREATE TABLE mta_sts_policies (
    domain       TEXT PRIMARY KEY,
    policy_id    TEXT NOT NULL,
    mode         TEXT NOT NULL,
    mx           TEXT NOT NULL,       -- the mx patterns, one per line
    max_age      INTEGER NOT NULL,
    policy_text  TEXT NOT NULL,
    fetched_at   INTEGER NOT NULL,
    expires_at   INTEGER NOT NULL
);

-- Counters of TLS sessions per UTC day and policy: result_type '' counts the successful
-- sessions, any other value the failures of that RFC 8460 §4.3 type at one MX host.
-- Workers add to them in batches (upserts), so a row is one counter, not one session.
CREATE TABLE tls_sessions (
    day            TEXT NOT NULL,     -- YYYY-MM-DD (UTC)
    policy_domain  TEXT NOT NULL,
    policy_type    TEXT NOT NULL,     -- sts, no-policy-found (tlsa: DANE)
    policy_hash    TEXT NOT NULL,     -- SHA-256 of policy_string: policies may be 64 KiB
    policy_string  TEXT NOT NULL,
    result_type    TEXT NOT NULL,
    sending_ip     TEXT NOT NULL,
    receiving_mx   TEXT NOT NULL,
    receiving_ip   TEXT NOT NULL,
    failure_code   TEXT NOT NULL,
    count          INTEGER NOT NULL,
    PRIMARY KEY (day, policy_domain, policy_type, policy_hash, result_type, sending_ip,
                 receiving_mx, receiving_ip, failure_code)
);
