-- mailstrom PostgreSQL schema, version 9: MTA-STS policies (RFC 8461) cached for every
-- worker on every host, and the TLS sessions counted for TLS reports (RFC 8460).

-- One row per recipient domain whose policy was fetched: replaced when the _mta-sts TXT
-- id changes or the policy ages out; kept when a refresh fails.
CREATE TABLE mta_sts_policies (
    domain       text PRIMARY KEY,
    policy_id    text NOT NULL,
    mode         text NOT NULL,
    mx           text NOT NULL,       -- the mx patterns, one per line
    max_age      integer NOT NULL,
    policy_text  text NOT NULL,
    fetched_at   timestamptz NOT NULL,
    expires_at   timestamptz NOT NULL
);

-- Counters of TLS sessions per UTC day and policy: result_type '' counts the successful
-- sessions, any other value the failures of that RFC 8460 §4.3 type at one MX host.
-- Workers add to them in batches (upserts), so a row is one counter, not one session.
CREATE TABLE tls_sessions (
    day            date NOT NULL,
    policy_domain  text NOT NULL,
    policy_type    text NOT NULL,     -- sts, no-policy-found (tlsa: DANE)
    policy_hash    text NOT NULL,     -- SHA-256 of policy_string: policies may be 64 KiB
    policy_string  text NOT NULL,
    result_type    text NOT NULL,
    sending_ip     text NOT NULL,
    receiving_mx   text NOT NULL,
    receiving_ip   text NOT NULL,
    failure_code   text NOT NULL,
    count          bigint NOT NULL,
    PRIMARY KEY (day, policy_domain, policy_type, policy_hash, result_type, sending_ip,
                 receiving_mx, receiving_ip, failure_code)
);
