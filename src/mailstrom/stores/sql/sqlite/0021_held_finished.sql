-- mailstrom SQLite schema, version 21: no finished message in messages_held.
--
-- A message that finished while held (its delivery in flight, or held and then
-- cancelled) kept held = 1 until purged, and so its entry in messages_held: every held
-- listing and count read and stepped over it. The store now clears the flag (and its
-- recipients' copy, bit 1) as such a message finishes; here, those that finished before.
-- Read from messages_held alone: nothing while no message is held.
UPDATE recipients SET held = held & 2
WHERE held & 1 AND message_seq IN (
    SELECT seq FROM messages m WHERE held = 1 AND NOT EXISTS (
        SELECT 1 FROM recipients p WHERE p.message_seq = m.seq
          AND p.state IN ('queued', 'deferred')));

UPDATE messages SET held = 0
WHERE held = 1 AND NOT EXISTS (
    SELECT 1 FROM recipients p WHERE p.message_seq = messages.seq
      AND p.state IN ('queued', 'deferred'));
