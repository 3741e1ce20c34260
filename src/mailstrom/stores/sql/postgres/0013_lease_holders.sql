-- mailstrom PostgreSQL schema, version 13: the workers that lease, and when each was last
-- seen alive.
--
-- A worker's lease tokens start with its holder ("<holder>.<random>"). Every worker moves
-- its own row's seen_at to the server's clock a few times a minute; the others take a
-- holder that stopped doing so for dead and give back what it leased (see
-- mailstrom/stores/postgres/holders.py). host and pid say which process a holder was;
-- stopped, that it closed its store and needs no judging: the next look removes the row.
CREATE TABLE lease_holders (
    holder     text PRIMARY KEY,
    host       text NOT NULL,
    pid        integer NOT NULL,
    started_at timestamptz NOT NULL,
    seen_at    timestamptz NOT NULL,
    stopped    boolean NOT NULL DEFAULT false
);
