-- mailstrom PostgreSQL schema, version 21: held messages in the dashboard's page order.
--
-- The dashboard's Held view found its messages by reading every message of the queue
-- (no index had the flag): a page listing three held messages read a million rows.
-- Only held messages are in it, so it costs nothing while none is held.
CREATE INDEX messages_held ON messages (created_at DESC, seq DESC) WHERE held;
