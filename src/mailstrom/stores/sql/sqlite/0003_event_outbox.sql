-- mailstrom SQLite schema, version 3: the event outbox. When events are enabled
-- (Store.enable_events: a hook, or the events setting), recording a result also appends
-- one row here in the same transaction, so an event exists exactly when its result was
-- committed. Senders lease rows as workers lease recipients, and mark them sent once the
-- endpoint acknowledged them; sent rows are pruned after a while.

CREATE TABLE events (
    -- AUTOINCREMENT: ids are never reused after a prune, so a reader's "after id N" and a
    -- receiver's de-duplication by id stay valid.
    id                INTEGER PRIMARY KEY AUTOINCREMENT,
    -- Copies, not references: an event outlives a purged message.
    message_id        TEXT NOT NULL,
    address           TEXT NOT NULL,
    state             TEXT NOT NULL,
    attempt           INTEGER NOT NULL,
    at                INTEGER NOT NULL,
    next_attempt_at   INTEGER,
    reply_code        INTEGER,
    reply_enhanced    TEXT,
    reply_text        TEXT,
    error             TEXT,
    reason_class      TEXT,
    mx_host           TEXT,
    ip                TEXT,
    tls               INTEGER NOT NULL DEFAULT 0,
    uncertain         INTEGER NOT NULL DEFAULT 0,
    sent_at           INTEGER,
    lease_token       TEXT,
    lease_expires_at  INTEGER
);

-- Senders walk the unsent events in id order.
CREATE INDEX events_unsent ON events (id) WHERE sent_at IS NULL;

CREATE INDEX events_lease ON events (lease_token) WHERE lease_token IS NOT NULL;

-- Pruning finds the old sent events without a scan.
CREATE INDEX events_sent ON events (sent_at) WHERE sent_at IS NOT NULL;
