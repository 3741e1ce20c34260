-- mailstrom PostgreSQL schema, version 4: whether each message was DKIM-signed when
-- queued. Compact JSON text written by mailstrom.stores.dkim_column: {"signed": [[domain,
-- selector, algorithm], ...]} or {"unsigned": reason}, bounded there. NULL when DKIM was
-- not configured and for messages queued before version 4.

ALTER TABLE messages ADD COLUMN dkim text;
