-- mailstrom PostgreSQL schema, version 3: the event outbox. When events are enabled
-- (Store.enable_events: a hook, or the events setting), recording results also appends one
-- row per result here in the same transaction, so an event exists exactly when its result
-- was committed. Senders lease rows with SKIP LOCKED as workers lease recipients, and mark
-- them sent once the endpoint acknowledged them; sent rows are pruned after a while.

CREATE TABLE events (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- Copies, not references: an event outlives a purged message.
    message_id        text NOT NULL,
    address           text NOT NULL,
    state             text NOT NULL,
    attempt           integer NOT NULL,
    at                timestamptz NOT NULL,
    next_attempt_at   timestamptz,
    reply_code        integer,
    reply_enhanced    text,
    reply_text        text,
    error             text,
    reason_class      text,
    mx_host           text,
    ip                text,
    tls               boolean NOT NULL DEFAULT false,
    uncertain         boolean NOT NULL DEFAULT false,
    sent_at           timestamptz,
    lease_token       text,
    lease_expires_at  timestamptz
);

-- Senders walk the unsent events in id order.
CREATE INDEX events_unsent ON events (id) WHERE sent_at IS NULL;

CREATE INDEX events_lease ON events (lease_token) WHERE lease_token IS NOT NULL;

-- Pruning finds the old sent events without a scan.
CREATE INDEX events_sent ON events (sent_at) WHERE sent_at IS NOT NULL;
