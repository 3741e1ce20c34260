-- mailstrom PostgreSQL schema, version 20: the recipients of a suspended destination and
-- of a held message are out of the due indexes.
--
-- Leasing and next_due read recipients_due (or recipients_lane_due) in due order and
-- filtered suspended destinations and held messages out row by row, so every call walked
-- the whole pending backlog of a suspended destination, and every recipient of a held
-- message (40,010 rows a next_due at 20,000 suspended recipients, 9 without). A pending
-- recipient is now "aside" while its domain has a row in suspensions or its message is
-- held, and the indexes leave such rows out. suspend and hold set it, enqueue sets it on
-- new rows (reading the suspension FOR KEY SHARE, so a resume waits for the enqueue and
-- then sees its rows), resume and release clear it, and so does the first lease or
-- next_due at or after a timed suspension's end, which deletes that row (see
-- queries.sql: end_suspensions). Leasing still filters by suspensions and messages.held:
-- a row is never leased early, whatever its flag. Here: what was suspended or held
-- before this version. Adding the column with a constant default rewrites nothing; the
-- two indexes are built again (a write lock on recipients while they are).
ALTER TABLE recipients ADD COLUMN aside boolean NOT NULL DEFAULT false;

UPDATE recipients r SET aside = true
WHERE r.state IN ('queued', 'deferred')
    AND (r.domain IN (SELECT domain FROM suspensions)
         OR EXISTS (SELECT 1 FROM messages m WHERE m.id = r.message_id AND m.held));

DROP INDEX recipients_due;
CREATE INDEX recipients_due
    ON recipients ((GREATEST(next_attempt_at, lease_expires_at)), seq, position)
    WHERE state IN ('queued', 'deferred') AND NOT aside;

DROP INDEX recipients_lane_due;
CREATE INDEX recipients_lane_due
    ON recipients (lane, (GREATEST(next_attempt_at, lease_expires_at)), seq, position)
    WHERE state IN ('queued', 'deferred') AND NOT aside;
