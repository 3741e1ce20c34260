-- mailstrom PostgreSQL schema, version 16: the mark "bounce notice owed".
--
-- The statement that records a recipient's final failure keeps there what the notice to
-- its sender will say of it (NULL: none owed); the transaction that queues the notice
-- clears it. One notice per message goes once none of its recipients is on its way any
-- more, made from the marks, and a worker that died between the two (or whose call the
-- store's stop cancelled) leaves them for the next one to find. Only failed rows carry
-- one, so the partial index costs the rest nothing.
ALTER TABLE recipients ADD COLUMN notice text;
CREATE INDEX recipients_notice ON recipients (seq) WHERE notice IS NOT NULL;
