-- mailstrom SQLite schema, version 4: whether each message was DKIM-signed when queued.
--
-- A table of its own rather than a column of messages: a column added now would come
-- after messages.data, and SQLite reaches a column past a large blob only by walking the
-- blob's overflow pages (about 2 ms per 5 MB message: benchmarks/status_read.py), so
-- every status read would pay for the message bytes. A message without a row has no DKIM
-- outcome: DKIM was not configured, or it was queued before version 4.
--
-- dkim is compact JSON written by mailstrom.stores.dkim_column, bounded there:
-- {"signed": [[domain, selector, algorithm], ...]} or {"unsigned": reason}.

CREATE TABLE message_dkim (
    message_seq INTEGER PRIMARY KEY REFERENCES messages (seq) ON DELETE CASCADE,
    dkim        TEXT NOT NULL
);
