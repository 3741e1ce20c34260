-- mailstrom schema, version 1. Applied by mailstrom.stores.postgres.migrate() inside one
-- transaction under an advisory lock; never edit a released migration, add a new file.

CREATE TABLE messages (
    id                text PRIMARY KEY,
    -- Insertion order: breaks ties between messages enqueued with the same timestamp.
    seq               bigint GENERATED ALWAYS AS IDENTITY,
    data              bytea NOT NULL,
    envelope_from     text NOT NULL,
    smtputf8          boolean NOT NULL DEFAULT false,
    eightbit          boolean NOT NULL DEFAULT false,
    created_at        timestamptz NOT NULL,
    held              boolean NOT NULL DEFAULT false,
    subject           text,
    header_message_id text,
    size              integer NOT NULL
);

CREATE INDEX messages_newest ON messages (created_at DESC, seq DESC);

CREATE TABLE recipients (
    message_id        text NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    address           text NOT NULL,
    -- The message's seq and the position in its recipient list: leasing takes due
    -- recipients in enqueue order, and work items keep the caller's order.
    seq               bigint NOT NULL,
    position          integer NOT NULL,
    domain            text NOT NULL,
    state             text NOT NULL
        CHECK (state IN ('queued', 'deferred', 'delivered', 'failed')),
    attempts          integer NOT NULL DEFAULT 0,
    first_attempt_at  timestamptz,
    last_attempt_at   timestamptz,
    next_attempt_at   timestamptz,
    -- When the recipient became final (delivered, failed or cancelled); purge uses it.
    finished_at       timestamptz,
    lease_token       text,
    lease_expires_at  timestamptz,
    reply_code        integer,
    reply_enhanced    text,
    reply_text        text,
    error             text,
    mx_host           text,
    ip                text,
    tls               boolean NOT NULL DEFAULT false,
    uncertain         boolean NOT NULL DEFAULT false,
    PRIMARY KEY (message_id, address)
);

-- Leasing reads this index in order and stops after LIMIT rows, with no sort. GREATEST
-- ignores NULLs, so the first key is the moment a pending recipient is due: its next
-- attempt, or its lease's expiry if that is later. Recipients under an unexpired lease
-- therefore sort after everything already due and the lease query never wades through
-- them. Ties (a batch enqueued at one instant) go in enqueue order, then recipient order.
CREATE INDEX recipients_due
    ON recipients ((GREATEST(next_attempt_at, lease_expires_at)), seq, position)
    WHERE state IN ('queued', 'deferred');

-- record and release find a lease's recipients by token: work proportional to the
-- lease, not to the table. Only leased rows are indexed.
CREATE INDEX recipients_lease ON recipients (lease_token) WHERE lease_token IS NOT NULL;

CREATE INDEX recipients_pending_domain ON recipients (domain)
    WHERE state IN ('queued', 'deferred');

CREATE TABLE attempts (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id        text NOT NULL,
    address           text NOT NULL,
    at                timestamptz NOT NULL,
    outcome           text NOT NULL CHECK (outcome IN ('delivered', 'temporary', 'permanent')),
    duration          double precision NOT NULL DEFAULT 0,
    mx_host           text,
    ip                text,
    port              integer,
    tls_version       text,
    tls_cipher        text,
    reply_code        integer,
    reply_enhanced    text,
    reply_text        text,
    error             text,
    uncertain         boolean NOT NULL DEFAULT false,
    FOREIGN KEY (message_id, address) REFERENCES recipients (message_id, address)
        ON DELETE CASCADE
);

CREATE INDEX attempts_recipient ON attempts (message_id, address, id);
