-- mailstrom PostgreSQL schema, version 7: traffic shaping shared by every worker of a
-- store. Pauses of throttled destinations, the token buckets of shaping rates, and which
-- pause holds a postponed recipient back (for its status).

CREATE TABLE destination_throttles (
    -- A shaping rule's pattern ("*.google.com") or, without a rule, a recipient domain.
    destination       text PRIMARY KEY,
    until             timestamptz NOT NULL,
    -- Throttles in a row: the pause doubles with each.
    strikes           integer NOT NULL,
    reply             text NOT NULL,
    since             timestamptz NOT NULL
);

CREATE TABLE shaping_buckets (
    -- "<destination> messages/minute" and the like: one row per rate in use.
    key               text PRIMARY KEY,
    tokens            double precision NOT NULL,
    at                timestamptz NOT NULL
);

-- The destination whose pause postponed this recipient (NULL: none); its status shows the
-- pause while it lasts and the recipient is pending.
ALTER TABLE recipients ADD COLUMN throttled_by text;
