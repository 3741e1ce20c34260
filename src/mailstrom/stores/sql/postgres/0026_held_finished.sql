-- mailstrom PostgreSQL schema, version 26: no finished message in messages_held.
--
-- A message that finished while held (its delivery in flight, or held and then
-- cancelled) kept held = true until purged, and so its entry in messages_held (schema
-- 21): the dashboard's Held view and every held count read and stepped over it. The
-- store now clears the flag as such a message finishes; here, those that finished
-- before. Read from messages_held alone: nothing while no message is held.
UPDATE messages m SET held = false
WHERE held AND NOT EXISTS (
    SELECT 1 FROM recipients r
    WHERE r.message_id = m.id AND r.state IN ('queued', 'deferred'));
