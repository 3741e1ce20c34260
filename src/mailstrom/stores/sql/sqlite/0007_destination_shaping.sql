-- mailstrom SQLite schema, version 7: traffic shaping shared by every worker of a store.
-- Pauses of throttled destinations, the token buckets of shaping rates, and which pause
-- holds a postponed recipient back (for its status).

CREATE TABLE destination_throttles (
    -- A shaping rule's pattern ("*.google.com") or, without a rule, a recipient domain.
    destination       TEXT PRIMARY KEY,
    until             INTEGER NOT NULL,
    -- Throttles in a row: the pause doubles with each.
    strikes           INTEGER NOT NULL,
    reply             TEXT NOT NULL,
    since             INTEGER NOT NULL
);

CREATE TABLE shaping_buckets (
    -- "<destination> messages/minute" and the like: one row per rate in use.
    key               TEXT PRIMARY KEY,
    tokens            REAL NOT NULL,
    at                INTEGER NOT NULL
);

-- The destination whose pause postponed this recipient (NULL: none); its status shows the
-- pause while it lasts and the recipient is pending.
ALTER TABLE recipients ADD COLUMN throttled_by TEXT;
