-- mailstrom SQLite schema, version 1. Applied by mailstrom.stores.sqlite on open, inside
-- one BEGIN IMMEDIATE transaction that also sets PRAGMA user_version; never edit a released
-- migration, add a new file. Times are integer microseconds since the Unix epoch (UTC).

CREATE TABLE messages (
    -- The rowid: recipients point at it (smaller and faster than the text id), and it
    -- breaks ties between messages enqueued with the same timestamp.
    seq               INTEGER PRIMARY KEY,
    id                TEXT NOT NULL UNIQUE,
    envelope_from     TEXT NOT NULL,
    smtputf8          INTEGER NOT NULL DEFAULT 0,
    eightbit          INTEGER NOT NULL DEFAULT 0,
    created_at        INTEGER NOT NULL,
    held              INTEGER NOT NULL DEFAULT 0,
    subject           TEXT,
    header_message_id TEXT,
    size              INTEGER NOT NULL,
    -- Last, so reading the other columns does not step over the bytes.
    data              BLOB NOT NULL
);

CREATE INDEX messages_newest ON messages (created_at, seq);

-- Counting held messages must not scan a table full of message bytes.
CREATE INDEX messages_held ON messages (held) WHERE held = 1;

CREATE TABLE recipients (
    id                INTEGER PRIMARY KEY,
    message_seq       INTEGER NOT NULL REFERENCES messages (seq) ON DELETE CASCADE,
    -- Position in the message's recipient list, so work items keep the caller's order.
    position          INTEGER NOT NULL,
    address           TEXT NOT NULL,
    domain            TEXT NOT NULL,
    state             TEXT NOT NULL
        CHECK (state IN ('queued', 'deferred', 'delivered', 'failed')),
    -- A copy of messages.held, so the due index can leave held recipients out.
    held              INTEGER NOT NULL DEFAULT 0,
    attempts          INTEGER NOT NULL DEFAULT 0,
    first_attempt_at  INTEGER,
    last_attempt_at   INTEGER,
    -- Set while pending, NULL once final.
    next_attempt_at   INTEGER,
    -- When the recipient became final (delivered, failed or cancelled); purge uses it.
    finished_at       INTEGER,
    lease_token       TEXT,
    lease_expires_at  INTEGER,
    reply_code        INTEGER,
    reply_enhanced    TEXT,
    reply_text        TEXT,
    error             TEXT,
    mx_host           TEXT,
    ip                TEXT,
    tls               INTEGER NOT NULL DEFAULT 0,
    uncertain         INTEGER NOT NULL DEFAULT 0,
    UNIQUE (message_seq, address)
);

-- Leasing walks this index in order and stops at its LIMIT. The key is the moment a
-- pending recipient is due: its next attempt, or its lease's expiry if that is later, so
-- recipients under an unexpired lease sort after everything already due. Queries must
-- spell the expression and the WHERE clause exactly like this to use it.
CREATE INDEX recipients_due
    ON recipients (max(next_attempt_at, coalesce(lease_expires_at, 0)), id)
    WHERE state IN ('queued', 'deferred') AND held = 0;

-- Stats count by state and pending recipients by domain from this index alone.
CREATE INDEX recipients_state_domain ON recipients (state, domain);

-- record and release find a lease's recipients by its token.
CREATE INDEX recipients_lease ON recipients (lease_token) WHERE lease_token IS NOT NULL;

CREATE TABLE attempts (
    id                INTEGER PRIMARY KEY,
    recipient_id      INTEGER NOT NULL REFERENCES recipients (id) ON DELETE CASCADE,
    at                INTEGER NOT NULL,
    outcome           TEXT NOT NULL CHECK (outcome IN ('delivered', 'temporary', 'permanent')),
    duration          REAL NOT NULL DEFAULT 0,
    mx_host           TEXT,
    ip                TEXT,
    port              INTEGER,
    tls_version       TEXT,
    tls_cipher        TEXT,
    reply_code        INTEGER,
    reply_enhanced    TEXT,
    reply_text        TEXT,
    error             TEXT,
    uncertain         INTEGER NOT NULL DEFAULT 0
);

CREATE INDEX attempts_recipient ON attempts (recipient_id, id);
