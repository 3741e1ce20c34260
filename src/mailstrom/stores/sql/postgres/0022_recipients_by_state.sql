-- mailstrom PostgreSQL schema, version 22: the dashboard finds a few queued, deferred or
-- failed messages from an index.
--
-- Its Queued, Deferred and Failed views walked every message of the queue newest first
-- and probed each: one message queued among deferred mail (or deferred among queued,
-- failed among delivered) read the whole queue to be listed, 25,003 rows at 10,000
-- recipients. Here the state leads the key, so each state is a range the planner drives
-- a page from when it holds few rows (and walks the messages when it holds many).
-- Delivered rows are left out: they are most of a queue's writes, and this index costs
-- the write path nothing else. It takes the place of recipients_pending_seq (schema
-- 11), which only found the oldest pending message, as recipients_pending_message
-- (schema 10, by seq first) does too: an enqueue or a deferral writes one entry to it
-- as it did to that one, and a failure one more (failures are few).
DROP INDEX recipients_pending_seq;
CREATE INDEX recipients_state_seq ON recipients (state, seq)
    WHERE state IN ('queued', 'deferred', 'failed');
