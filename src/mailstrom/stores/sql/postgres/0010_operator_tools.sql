-- mailstrom PostgreSQL schema, version 10: what the operator's tools need.
--
-- Suspended destinations: while a row here is in force (until IS NULL, or in the future),
-- no worker leases a recipient at that domain; its messages stay as they are. Shared by
-- every worker on every host because it lives in the queue.
CREATE TABLE suspensions (
    domain            text PRIMARY KEY,
    suspended_at      timestamptz NOT NULL,
    -- NULL: until resumed.
    until             timestamptz
);

-- The queue view lists pending messages newest first and `queue --shape` counts pending
-- recipients per domain and age without reading message rows.
CREATE INDEX recipients_pending_message ON recipients (seq, domain)
    WHERE state IN ('queued', 'deferred');
