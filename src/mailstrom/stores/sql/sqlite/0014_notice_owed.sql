-- mailstrom SQLite schema, version 14: the mark "bounce notice owed".
--
-- The write that records a recipient's final failure keeps there what the notice to its
-- sender will say of it (NULL: none owed); the write that queues the notice clears it.
-- One notice per message goes once none of its recipients is on its way any more, made
-- from the marks, and a worker that died between the two finds them when it starts
-- again. Only failed rows carry one, so the partial index costs the rest nothing.
ALTER TABLE recipients ADD COLUMN notice TEXT;
CREATE INDEX recipients_notice ON recipients (message_seq) WHERE notice IS NOT NULL;
