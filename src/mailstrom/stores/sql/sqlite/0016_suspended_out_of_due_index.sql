-- mailstrom SQLite schema, version 16: the recipients of a suspended destination are out
-- of the due index.
--
-- Leasing and next_due read recipients_lane_due in due order and filtered suspended
-- destinations out row by row, so every call walked the whole pending backlog of a
-- suspended destination (0.16 s a call at 200,000 recipients). recipients.held now has
-- a second bit, 2 (sqlite_queue.SET_ASIDE), on the pending recipients of a destination
-- with a row in suspensions; the index's WHERE held = 0 leaves them out. Bit 1 is still
-- the copy of messages.held. Here: the suspensions made before this version.
UPDATE recipients SET held = held | 2
WHERE state IN ('queued', 'deferred')
    AND domain IN (SELECT domain FROM suspensions);
