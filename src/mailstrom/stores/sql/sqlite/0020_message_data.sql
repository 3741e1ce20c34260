-- mailstrom SQLite schema, version 20: the message's bytes in a table of their own.
--
-- messages.data was to be the last column, so that reading the others would not step over
-- the bytes; the columns versions 5, 6 and 8 added (tags, metadata, priority, send_at,
-- expires_at, idempotency_key, dsn, require_tls) came after it. SQLite reaches a column
-- past a large blob only by walking its overflow pages, and an UPDATE of any column of a
-- row reads all of it to write the row again: hold and release of 1,000 messages of
-- 300 kB read 605 MB, a --tag filter read every message's bytes
-- (benchmarks/sqlite_row_layout.py). Here, a row of messages holds no bytes: its reads
-- and writes stay as small as its columns, and the bytes are read only by what needs
-- them (the lease, message_data()), found by the message's row number. (messages rebuilt
-- with data truly last would not do: an UPDATE of held still read each whole row.)
CREATE TABLE message_data (
    seq  INTEGER PRIMARY KEY REFERENCES messages (seq) ON DELETE CASCADE,
    data BLOB NOT NULL
);

INSERT INTO message_data (seq, data) SELECT seq, data FROM messages;

-- Rewrites every row of messages without its bytes (SQLite 3.35, as RETURNING needs). The
-- pages the bytes held stay in the file as free pages, which later messages reuse (a
-- VACUUM gives them back): a queue of 300 MB took 7 s and grew to 600 MB.
ALTER TABLE messages DROP COLUMN data;
