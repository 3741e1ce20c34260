-- mailstrom SQLite schema, version 11: indexes the dashboard (`mailstrom web`, the read
-- model in mailstrom.readmodel.sqlite) pages on, so that its pages stay fast with a
-- million messages queued.

-- Pending recipients by message: the oldest pending message is this index's first entry,
-- and the queue page's pending, queued and deferred views probe it per message. Only
-- pending rows are in it, so it stays as small as the backlog.
CREATE INDEX recipients_pending_message ON recipients (message_seq, state)
    WHERE state IN ('queued', 'deferred');

-- Searching the queue by recipient address.
CREATE INDEX recipients_address ON recipients (address);

-- The overview's throughput chart counts the last hour's attempts by outcome from this
-- index alone.
CREATE INDEX attempts_at ON attempts (at, outcome);
