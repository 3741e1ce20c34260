-- mailstrom SQLite schema, version 11: indexes the dashboard (`mailstrom web`, the read
-- model in mailstrom.readmodel.sqlite) pages on, so that its pages stay fast with a
-- million messages queued.

-- Pending recipients by message: the oldest pending message is the first entry of
-- recipients_pending_message, and the queue page's pending, queued and deferred views
-- probe it per message. Version 10 (the operator's tools) already created that partial
-- index on (message_seq, domain, state), which serves these queries as well.

-- Searching the queue by recipient address.
CREATE INDEX recipients_address ON recipients (address);

-- The overview's throughput chart counts the last hour's attempts by outcome from this
-- index alone.
CREATE INDEX attempts_at ON attempts (at, outcome);
