-- mailstrom SQLite schema, version 5: what the queue keeps beside a message's bytes
-- (mailstrom.message.attributes): tags and metadata, its priority lane, when it may go and
-- until when, and idempotency keys. Columns are NULL for messages queued before version 5.

-- A JSON array of strings, and a JSON object of strings.
ALTER TABLE messages ADD COLUMN tags TEXT;
ALTER TABLE messages ADD COLUMN metadata TEXT;
ALTER TABLE messages ADD COLUMN priority TEXT;
-- The earliest delivery time (recipients start with next_attempt_at = send_at) and the
-- moment still-pending recipients fail as "expired".
ALTER TABLE messages ADD COLUMN send_at INTEGER;
ALTER TABLE messages ADD COLUMN expires_at INTEGER;
ALTER TABLE messages ADD COLUMN idempotency_key TEXT;

-- A copy of messages.priority, so that leasing walks one lane's due recipients in one
-- index range. '' for recipients queued before version 5: no configured lane, leased
-- after the configured ones have nothing due.
ALTER TABLE recipients ADD COLUMN lane TEXT NOT NULL DEFAULT '';

-- The due index of one lane: the same expression and WHERE clause as recipients_due
-- (queries must spell them exactly like this), behind the lane.
CREATE INDEX recipients_lane_due
    ON recipients (lane, max(next_attempt_at, coalesce(lease_expires_at, 0)), id)
    WHERE state IN ('queued', 'deferred') AND held = 0;

-- One row per key while it holds: the PRIMARY KEY is what makes two racing submissions
-- with one key queue one message (the second's INSERT conflicts; nothing is read first).
-- An expired row is taken over by the next submission with its key.
CREATE TABLE idempotency_keys (
    key               TEXT PRIMARY KEY,
    message_seq       INTEGER NOT NULL REFERENCES messages (seq) ON DELETE CASCADE,
    expires_at        INTEGER NOT NULL
);

CREATE INDEX idempotency_keys_message ON idempotency_keys (message_seq);

-- Events carry the message's tags and metadata (copies: an event outlives its message).
ALTER TABLE events ADD COLUMN tags TEXT;
ALTER TABLE events ADD COLUMN metadata TEXT;
