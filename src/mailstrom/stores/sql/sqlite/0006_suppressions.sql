-- mailstrom SQLite schema, version 6: the suppression list, shared by every worker of the
-- queue. A target is a lower-case address, or a domain (no "@") covering every address
-- there. The worker looks the recipients of each lease up by primary key; expired entries
-- are ignored and replaced by the next entry for their target.

CREATE TABLE suppressions (
    target            TEXT PRIMARY KEY,
    source            TEXT NOT NULL
        CHECK (source IN ('hard_bounce', 'async_bounce', 'complaint', 'manual')),
    reply             TEXT NOT NULL DEFAULT '',
    created_at        INTEGER NOT NULL,
    expires_at        INTEGER,
    message_id        TEXT
) WITHOUT ROWID;

-- `mailstrom bounce` finds the message a returned Message-ID names.
CREATE INDEX messages_header_id ON messages (header_message_id)
    WHERE header_message_id IS NOT NULL;

-- The delivery status notifications a message asks for (RFC 3461), as
-- mailstrom.message.dsn.DSN.encode() writes them; NULL for none (after data: a NULL
-- costs no read past the message bytes).
ALTER TABLE messages ADD COLUMN dsn TEXT;
