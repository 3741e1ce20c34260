-- mailstrom SQLite schema, version 10: what the operator's tools need.
--
-- Suspended destinations: while a row here is in force (until IS NULL, or in the future),
-- no worker leases a recipient at that domain; its messages stay as they are. Shared by
-- every worker of the queue because it lives in the queue.
CREATE TABLE suspensions (
    domain            TEXT PRIMARY KEY,
    suspended_at      INTEGER NOT NULL,
    -- NULL: until resumed.
    until             INTEGER
);

-- The queue view lists pending messages newest first and counts them, and `queue --shape`
-- counts pending recipients per domain and age, from this index alone (it holds the state
-- so that it covers those queries: no message rows are read, whatever their size).
CREATE INDEX recipients_pending_message ON recipients (message_seq, domain, state)
    WHERE state IN ('queued', 'deferred');

-- Messages with a failed recipient, for counting failed and delivered messages by
-- subtraction (`queue --state failed`) instead of deriving every message's state.
-- Failed recipients are few, and written once.
CREATE INDEX recipients_failed_message ON recipients (message_seq) WHERE state = 'failed';
