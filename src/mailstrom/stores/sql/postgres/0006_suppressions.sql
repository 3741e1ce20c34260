-- mailstrom PostgreSQL schema, version 6: the suppression list, shared by every worker on
-- every host. A target is a lower-case address, or a domain (no "@") covering every
-- address there. The worker looks the recipients of each lease up by primary key; expired
-- entries are ignored and replaced by the next entry for their target. Targets compare
-- and sort byte-wise (COLLATE "C"), so listing pages the same way on every server.

CREATE TABLE suppressions (
    target            text COLLATE "C" PRIMARY KEY,
    source            text NOT NULL
        CHECK (source IN ('hard_bounce', 'async_bounce', 'complaint', 'manual')),
    reply             text NOT NULL DEFAULT '',
    created_at        timestamptz NOT NULL,
    expires_at        timestamptz,
    message_id        text
);

-- `mailstrom bounce` finds the message a returned Message-ID names.
CREATE INDEX messages_header_id ON messages (header_message_id)
    WHERE header_message_id IS NOT NULL;

-- The delivery status notifications a message asks for (RFC 3461), as
-- mailstrom.message.dsn.DSN.encode() writes them; NULL for none.
ALTER TABLE messages ADD COLUMN dsn text;
