-- mailstrom PostgreSQL schema, version 11: indexes the dashboard (`mailstrom web`, the read
-- model in mailstrom.readmodel.postgres) relies on, so that its pages stay fast with a
-- million messages queued.

-- Pending recipients in enqueue order: the oldest pending message is the first entry.
-- Only pending rows are in it, so it stays as small as the backlog.
CREATE INDEX recipients_pending_seq ON recipients (seq)
    WHERE state IN ('queued', 'deferred');

-- Searching the queue by recipient address.
CREATE INDEX recipients_address ON recipients (address);

-- The overview's throughput chart counts the last hour's attempts by outcome.
CREATE INDEX attempts_at ON attempts (at, outcome);
