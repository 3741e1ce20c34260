-- mailstrom PostgreSQL schema, version 15: each lease holder's own dead_after (seconds),
-- the time unseen after which it may be taken for dead. Workers judged each other by the
-- judge's own store URL's dead_after, so a worker with dead_after=1s took one with 2m
-- (a beat every 15 s) for dead between two of its beats, while it delivered. A holder
-- is now judged by the longer of the judge's and its own. Rows an older mailstrom wrote
-- get the default two minutes.
ALTER TABLE lease_holders ADD COLUMN dead_after double precision NOT NULL DEFAULT 120;
