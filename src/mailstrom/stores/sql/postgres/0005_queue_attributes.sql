-- mailstrom PostgreSQL schema, version 5: what the queue keeps beside a message's bytes
-- (mailstrom.message.attributes): tags and metadata, its priority lane, when it may go and
-- until when, and idempotency keys. Columns are NULL for messages queued before version 5.

ALTER TABLE messages ADD COLUMN tags text[];
ALTER TABLE messages ADD COLUMN metadata jsonb;
ALTER TABLE messages ADD COLUMN priority text;
-- The earliest delivery time (recipients start with next_attempt_at = send_at) and the
-- moment still-pending recipients fail as "expired".
ALTER TABLE messages ADD COLUMN send_at timestamptz;
ALTER TABLE messages ADD COLUMN expires_at timestamptz;
ALTER TABLE messages ADD COLUMN idempotency_key text;

-- Filtering by tag ("mailstrom queue --tag") looks the tag up instead of reading every row.
CREATE INDEX messages_tags ON messages USING gin (tags);

-- A copy of messages.priority, so that leasing walks one lane's due recipients in one
-- index range. '' for recipients queued before version 5: no configured lane, leased
-- after the configured ones have nothing due.
ALTER TABLE recipients ADD COLUMN lane text NOT NULL DEFAULT '';

CREATE INDEX recipients_lane_due
    ON recipients (lane, (GREATEST(next_attempt_at, lease_expires_at)), seq, position)
    WHERE state IN ('queued', 'deferred');

-- One row per key while it holds: the PRIMARY KEY is what makes two racing submissions
-- with one key queue one message (INSERT ... ON CONFLICT; nothing is read first). An
-- expired row is taken over by the next submission with its key. The key is claimed
-- before its message is inserted, in the same transaction: hence the deferred check.
CREATE TABLE idempotency_keys (
    key               text PRIMARY KEY,
    message_id        text NOT NULL REFERENCES messages (id) ON DELETE CASCADE
                      DEFERRABLE INITIALLY DEFERRED,
    expires_at        timestamptz NOT NULL
);

CREATE INDEX idempotency_keys_message ON idempotency_keys (message_id);

-- Events carry the message's tags and metadata (copies: an event outlives its message).
ALTER TABLE events ADD COLUMN tags text[];
ALTER TABLE events ADD COLUMN metadata jsonb;
