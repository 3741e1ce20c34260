-- mailstrom PostgreSQL schema, version 12: the store's secret key for VERP tokens.
--
-- A VERP token's digest of the recipient's address is keyed with it, so that a recipient
-- who sees their own envelope sender cannot work out a co-recipient's token and forge a
-- bounce about them. One row, made (32 random bytes) the first time a process asks for
-- it; every process sharing the store uses the same key.
CREATE TABLE verp_key (
    id  integer PRIMARY KEY CHECK (id = 1),
    key bytea NOT NULL
);
