-- mailstrom PostgreSQL schema, version 29: the recipients with a capital letter in their
-- address, by its fold.
--
-- Store.recipients_by_address (applying a bounce or complaint) returns every recipient
-- whose address differs from one named only in the case of ASCII letters, so it folded
-- and compared each address of the message: a report about one recipient of a message of
-- 30,000 read the 30,000 rows (126 ms). An address with no capital letter is its own
-- fold, found in the primary key; the others are sought here, by the query's fold
-- exactly (queries.sql: recipients_by_address). Only those are in it: most mail is
-- addressed in lower case, and its enqueue writes no entry more (an index of every
-- recipient made an enqueue of 30,000 a sixth slower). A write lock on recipients while
-- it is built.
-- IF NOT EXISTS: a store set back a version by hand runs the latest again.
CREATE INDEX IF NOT EXISTS recipients_folded
    ON recipients (message_id, translate(address, 'ABCDEFGHIJKLMNOPQRSTUVWXYZ',
                                                  'abcdefghijklmnopqrstuvwxyz'))
    WHERE address <> translate(address, 'ABCDEFGHIJKLMNOPQRSTUVWXYZ',
                               'abcdefghijklmnopqrstuvwxyz');
