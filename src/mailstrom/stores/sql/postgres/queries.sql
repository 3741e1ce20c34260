-- Queries of mailstrom.stores.postgres. Each starts at a "-- name: <name>" line and runs
-- as ONE statement: on an autocommit connection that is one round trip and one
-- transaction. Parameters use psycopg's named placeholders; a pending recipient is one
-- whose state is queued or deferred. Do not use a percent sign in these comments: psycopg
-- would read it as a placeholder.

-- name: enqueue
-- Messages and their recipients arrive as parallel arrays (one element per row), so a
-- batch is one statement (one per 64 MiB of data: rows.ENQUEUE_CHUNK_BYTES). No NOTIFY here: the store's notifier sends it after the
-- commit (a NOTIFY would serialise the commits of every client). Tags
-- arrive as one JSON array text per message (arrays of arrays must be rectangular), and
-- recipients are first due at the message's send_at when it is later than now. The
-- messages' data goes in binary: as hex text it took twice its size and time.
WITH new_messages AS (
    INSERT INTO messages (id, data, envelope_from, smtputf8, eightbit, subject,
                          header_message_id, size, created_at, held, dkim, require_tls,
                          tags, metadata, priority, send_at, expires_at, idempotency_key,
                          dsn)
    SELECT t.id, t.data, t.envelope_from, t.smtputf8, t.eightbit, t.subject,
           t.header_message_id, t.size, %(now)s, %(held)s, t.dkim, t.require_tls,
           CASE WHEN t.tags IS NOT NULL
                THEN ARRAY(SELECT jsonb_array_elements_text(t.tags::jsonb)) END,
           t.metadata::jsonb, t.priority, t.send_at, t.expires_at, t.idempotency_key, t.dsn
    FROM unnest(%(ids)s::text[], %(datas)b::bytea[], %(froms)s::text[],
                %(smtputf8)s::boolean[], %(eightbit)s::boolean[], %(subjects)s::text[],
                %(header_ids)s::text[], %(sizes)s::integer[], %(dkims)s::text[],
                %(require_tls)s::boolean[], %(tags)s::text[],
                %(metadatas)s::text[], %(priorities)s::text[], %(send_ats)s::timestamptz[],
                %(expires_ats)s::timestamptz[], %(keys)s::text[], %(dsns)s::text[])
         WITH ORDINALITY
         AS t(id, data, envelope_from, smtputf8, eightbit, subject, header_message_id, size,
              dkim, require_tls, tags, metadata, priority, send_at, expires_at,
              idempotency_key, dsn, n)
    ORDER BY t.n  -- seq follows the caller's order
    ON CONFLICT (id) DO NOTHING  -- written again after its answer was lost: once
    RETURNING id, seq, send_at, priority
), suspended AS (
    -- The suspensions of these domains, whatever their end: a recipient there (or of a
    -- held message) is set aside (schema version 20). FOR KEY SHARE holds off a resume
    -- (or the end of a timed suspension: end_suspensions) until this commits, so that it
    -- then finds these rows; one that went first is read as gone. In domain order, as
    -- lock_ended locks them: the other way round, each could wait for the other.
    SELECT domain FROM suspensions
    WHERE domain = ANY (%(r_domains)s::text[])
    ORDER BY domain
    FOR KEY SHARE
), new_recipients AS (
    INSERT INTO recipients (message_id, seq, address, position, domain, state,
                            next_attempt_at, lane, aside)
    SELECT t.message_id, nm.seq, t.address, t.position, t.domain, 'queued',
           GREATEST(%(now)s, nm.send_at), COALESCE(nm.priority, ''),
           %(held)s OR t.domain IN (SELECT domain FROM suspended)
    FROM unnest(%(r_ids)s::text[], %(r_addresses)s::text[], %(r_positions)s::integer[],
                %(r_domains)s::text[]) AS t(message_id, address, position, domain)
    JOIN new_messages nm ON nm.id = t.message_id
)
SELECT count(*) FROM new_messages;

-- name: claim_key
-- Make an idempotency key name a message about to be inserted in this transaction (the
-- foreign key is checked at commit): a new key, or one whose window has passed. Returns
-- no row while another message holds the key; the PRIMARY KEY decides, and a submission
-- racing ours waits here until ours commits or rolls back.
INSERT INTO idempotency_keys AS k (key, message_id, expires_at)
VALUES (%(key)s, %(id)s, %(until)s)
ON CONFLICT (key) DO UPDATE
    SET message_id = EXCLUDED.message_id, expires_at = EXCLUDED.expires_at
    WHERE k.expires_at <= %(now)s
RETURNING message_id;

-- name: key_holder
SELECT message_id FROM idempotency_keys WHERE key = %(key)s;

-- name: lease
-- Lock due recipients (skipping rows other workers are locking right now), stamp them
-- with our token, and return them with their message (see _lease_rest).
-- The ORDER BY is exactly the index recipients_due, so this reads LIMIT index entries
-- (plus any of a message held or a destination suspended as this began: the others are
-- aside, out of the index) and sorts nothing once the table has statistics.
-- The message is locked FOR SHARE too: a hold committed after this statement's snapshot
-- only locks the recipients (READ COMMITTED rechecks a row only when a row it locks was
-- updated), so with the recipient alone the held message read as not held and was
-- leased, its worker never told; locking the message row finds the hold's version and
-- rechecks NOT m.held on it. (KEY SHARE would not: it passes a non-key update.) A
-- message being held right now is skipped, as a locked recipient is.
WITH due AS MATERIALIZED (
    SELECT r.ctid AS row_id, r.message_id, r.address, 0 AS rank,
           GREATEST(r.next_attempt_at, r.lease_expires_at) AS due_at, r.seq, r.position
    FROM recipients r
    JOIN messages m ON m.id = r.message_id
    WHERE r.state IN ('queued', 'deferred') AND NOT r.aside
      AND GREATEST(r.next_attempt_at, r.lease_expires_at) <= %(now)s
      AND NOT m.held
      -- Suspended destinations (schema version 10) wait, unattempted. Their recipients
      -- are aside (schema version 20), out of the index, but one queued as the
      -- suspension began may not be: these filters, not the flag, decide. NOT IN (a
      -- hashed set of the suspended domains, tested on each row read; domain is never
      -- NULL), not NOT EXISTS: the planner made that a hash anti join, and with any
      -- suspension in force read and sorted every due recipient instead of the index's
      -- first LIMIT entries (0.5 s a lease at 50,000 due).
      AND r.domain NOT IN (SELECT s.domain FROM suspensions s
                           WHERE s.until IS NULL OR s.until > %(now)s)
    ORDER BY GREATEST(r.next_attempt_at, r.lease_expires_at), r.seq, r.position
    LIMIT %(limit)s
    FOR UPDATE OF r SKIP LOCKED FOR SHARE OF m SKIP LOCKED
)
-- include: _lease_rest

-- name: lease_lanes
-- The lease of named lanes, highest first: for each lane (an element of the parallel arrays
-- lanes and lane_limits) the earliest due recipients of that lane, up to its own limit,
-- read from its range of recipients_lane_due; then the first LIMIT of them in lane order.
-- Rows locked here beyond that LIMIT stay unleased and are unlocked at commit.
WITH picked AS MATERIALIZED (
    SELECT l.rank, d.*
    FROM unnest(%(lanes)s::text[], %(lane_limits)s::bigint[]) WITH ORDINALITY
         AS l(lane, most, rank)
    CROSS JOIN LATERAL (
        SELECT r.ctid AS row_id, r.message_id, r.address, r.seq, r.position,
               GREATEST(r.next_attempt_at, r.lease_expires_at) AS due_at
        FROM recipients r
        JOIN messages m ON m.id = r.message_id
        WHERE r.lane = l.lane
          AND r.state IN ('queued', 'deferred') AND NOT r.aside
          AND GREATEST(r.next_attempt_at, r.lease_expires_at) <= %(now)s
          AND NOT m.held
          AND r.domain NOT IN (SELECT s.domain FROM suspensions s
                               WHERE s.until IS NULL OR s.until > %(now)s)
        ORDER BY GREATEST(r.next_attempt_at, r.lease_expires_at), r.seq, r.position
        LIMIT l.most
        FOR UPDATE OF r SKIP LOCKED FOR SHARE OF m SKIP LOCKED
    ) d
), due AS MATERIALIZED (
    SELECT row_id, message_id, address, rank, due_at, seq, position
    FROM picked
    ORDER BY rank, due_at, seq, position
    LIMIT %(limit)s
)
-- include: _lease_rest

-- name: lease_other_lanes
-- The lease of recipients in lanes not named (queued before lanes existed, or in a lane
-- since removed from the configuration): run only when every named lane had room left and
-- nothing more due, so walking recipients_due meets few rows of the named lanes.
WITH due AS MATERIALIZED (
    SELECT r.ctid AS row_id, r.message_id, r.address, 0 AS rank,
           GREATEST(r.next_attempt_at, r.lease_expires_at) AS due_at, r.seq, r.position
    FROM recipients r
    JOIN messages m ON m.id = r.message_id
    WHERE r.state IN ('queued', 'deferred') AND NOT r.aside
      AND GREATEST(r.next_attempt_at, r.lease_expires_at) <= %(now)s
      AND NOT m.held
      AND r.lane <> ALL (%(lanes)s::text[])
      AND r.domain NOT IN (SELECT s.domain FROM suspensions s
                           WHERE s.until IS NULL OR s.until > %(now)s)
    ORDER BY GREATEST(r.next_attempt_at, r.lease_expires_at), r.seq, r.position
    LIMIT %(limit)s
    FOR UPDATE OF r SKIP LOCKED FOR SHARE OF m SKIP LOCKED
)
-- include: _lease_rest

-- name: fair_lease_lanes
-- The lease of named lanes (as lease_lanes), fair between destinations
-- (stores/fairness.py): see _fair_due.
WITH RECURSIVE lanes_in AS (
    SELECT l.lane, l.most, l.rank
    FROM unnest(%(lanes)s::text[], %(lane_limits)s::bigint[]) WITH ORDINALITY
         AS l(lane, most, rank)
)
-- include: _fair_due
-- include: _lease_rest

-- name: fair_lease_other_lanes
-- The lease of lanes not named (as lease_other_lanes), fair between destinations (see
-- _fair_due), and of every lane with none named: the lanes not named are
-- found by a skip-scan of recipients_lane_due (one probe a lane), and each is read as a
-- named lane of the whole limit, the earliest due of them all leased first.
WITH RECURSIVE lane_walk (lane) AS (
    SELECT (SELECT r.lane FROM recipients r
            WHERE r.state IN ('queued', 'deferred') AND NOT r.aside
            ORDER BY r.lane LIMIT 1)
    UNION ALL
    SELECT (SELECT r.lane FROM recipients r
            WHERE r.state IN ('queued', 'deferred') AND NOT r.aside AND r.lane > w.lane
            ORDER BY r.lane LIMIT 1)
    FROM lane_walk w
    WHERE w.lane IS NOT NULL
), lanes_in AS (
    -- From an array: read from the recursive CTE, the planner counted on 100 lanes,
    -- priced the statement past jit_above_cost and compiled it (seconds a lease).
    SELECT o.lane, %(limit)s::bigint AS most, 0::bigint AS rank
    FROM unnest(ARRAY(SELECT w.lane FROM lane_walk w
                      WHERE w.lane IS NOT NULL AND w.lane <> ALL (%(lanes)s::text[]))) AS o(lane)
)
-- include: _fair_due
-- include: _lease_rest

-- name: _fair_due
-- The `due` CTE of a fair lease, after a `lanes_in` CTE (lane, most, rank) in a WITH
-- RECURSIVE: no recipient at a busy domain, at most share of one domain in a lane. First
-- each lane's `most` earliest due, locked, read as lease_lanes reads them; of those, the
-- rows that pass are kept (the others stay unleased, unlocked at commit). When that read
-- was full and left room, a skip-scan of recipients_destination_due (schema version 23)
-- walks the lane's domains in name order from after the lane's turn (the domain the last
-- fair lease of the store object reached; wrapping around), one probe a domain that also
-- reads its earliest due, up to `destinations` domains with something due (at most
-- `visits` domains in all), and takes, locked, each such domain's earliest due up to its
-- share (its rows the first read kept counted) until the lane's room is used: a backlog
-- at a busy domain is never walked past.
, first AS MATERIALIZED (
    SELECT l.lane, l.rank, d.*
    FROM lanes_in l
    CROSS JOIN LATERAL (
        SELECT r.ctid AS row_id, r.domain,
               GREATEST(r.next_attempt_at, r.lease_expires_at) AS due_at, r.seq, r.position
        FROM recipients r
        JOIN messages m ON m.id = r.message_id
        WHERE r.lane = l.lane
          AND r.state IN ('queued', 'deferred') AND NOT r.aside
          AND GREATEST(r.next_attempt_at, r.lease_expires_at) <= %(now)s
          AND NOT m.held
          AND r.domain NOT IN (SELECT s.domain FROM suspensions s
                               WHERE s.until IS NULL OR s.until > %(now)s)
        ORDER BY GREATEST(r.next_attempt_at, r.lease_expires_at), r.seq, r.position
        LIMIT l.most
    ) d
), kept AS MATERIALIZED (
    -- Only these are locked: a busy backlog read again by every lease is not (a lock
    -- writes to each row). Locked, each is checked again (READ COMMITTED rechecks the
    -- locked row's new version): one changed since the read is left for the next lease.
    SELECT r.lane, (SELECT l.rank FROM lanes_in l WHERE l.lane = r.lane LIMIT 1) AS rank,
           r.domain, r.ctid AS row_id, r.message_id, r.address, r.seq, r.position,
           GREATEST(r.next_attempt_at, r.lease_expires_at) AS due_at
    FROM recipients r
    JOIN messages m ON m.id = r.message_id
    WHERE r.ctid = ANY (ARRAY(
            SELECT f.row_id
            FROM (SELECT f.row_id, row_number() OVER (PARTITION BY f.lane, f.domain
                                                      ORDER BY f.due_at, f.seq, f.position) AS nth
                  FROM first f
                  WHERE f.domain <> ALL (%(busy)s::text[])) f
            WHERE f.nth <= %(share)s))
      AND r.state IN ('queued', 'deferred') AND NOT r.aside
      AND GREATEST(r.next_attempt_at, r.lease_expires_at) <= %(now)s
      AND NOT m.held
    FOR UPDATE OF r SKIP LOCKED FOR SHARE OF m SKIP LOCKED
), room AS MATERIALIZED (
    SELECT l.lane, l.rank, l.most - (SELECT count(*) FROM kept k WHERE k.lane = l.lane) AS left,
           coalesce((SELECT t.after
                     FROM unnest(%(turn_lanes)s::text[], %(turn_after)s::text[]) AS t(lane, after)
                     WHERE t.lane = l.lane LIMIT 1), '') AS after
    FROM lanes_in l
    WHERE (SELECT count(*) FROM first f WHERE f.lane = l.lane) >= l.most
      AND (SELECT count(*) FROM kept k WHERE k.lane = l.lane) < l.most
), walk (lane, domain, due_at, after, wrapped, visits, found) AS (
    SELECT rm.lane, rm.after, NULL::timestamptz, rm.after, false, 0, 0
    FROM room rm
    UNION ALL
    SELECT w.lane, n.domain, n.due_at, w.after, n.wrapped, w.visits + 1,
           w.found + CASE WHEN n.due_at <= %(now)s THEN 1 ELSE 0 END
    FROM walk w
    CROSS JOIN LATERAL (
        (SELECT r.domain, GREATEST(r.next_attempt_at, r.lease_expires_at) AS due_at,
                w.wrapped AS wrapped
         FROM recipients r
         WHERE r.lane = w.lane AND r.state IN ('queued', 'deferred') AND NOT r.aside
           AND r.domain > w.domain
         ORDER BY r.domain, GREATEST(r.next_attempt_at, r.lease_expires_at)
         LIMIT 1)
        UNION ALL
        (SELECT r.domain, GREATEST(r.next_attempt_at, r.lease_expires_at), true
         FROM recipients r
         WHERE NOT w.wrapped
           AND r.lane = w.lane AND r.state IN ('queued', 'deferred') AND NOT r.aside
         ORDER BY r.domain, GREATEST(r.next_attempt_at, r.lease_expires_at)
         LIMIT 1)
        LIMIT 1
    ) n
    WHERE w.visits < %(visits)s AND w.found < %(destinations)s
      AND NOT (n.wrapped AND n.domain > w.after)
), counts AS MATERIALIZED (
    SELECT lane, domain, count(*) AS held FROM kept GROUP BY lane, domain
), sought AS MATERIALIZED (
    SELECT rm.rank, s.*
    FROM room rm
    CROSS JOIN LATERAL (
        SELECT d.*
        FROM walk w
        CROSS JOIN LATERAL (
            SELECT coalesce((SELECT c.held FROM counts c
                             WHERE c.lane = w.lane AND c.domain = w.domain), 0) AS held
        ) c
        CROSS JOIN LATERAL (
            SELECT r.ctid AS row_id, r.message_id, r.address, r.seq, r.position,
                   GREATEST(r.next_attempt_at, r.lease_expires_at) AS due_at
            FROM recipients r
            JOIN messages m ON m.id = r.message_id
            WHERE r.lane = w.lane AND r.domain >= w.domain AND r.domain <= w.domain
              AND r.state IN ('queued', 'deferred') AND NOT r.aside
              AND GREATEST(r.next_attempt_at, r.lease_expires_at) <= %(now)s
              AND NOT m.held
              AND r.domain NOT IN (SELECT s.domain FROM suspensions s
                                   WHERE s.until IS NULL OR s.until > %(now)s)
            -- The domain as a range, and the index's own order: with domain = (a value
            -- to the planner) it dropped the domain from the order and walked
            -- recipients_due in due order, a busy domain's backlog included.
            ORDER BY r.lane, r.domain, GREATEST(r.next_attempt_at, r.lease_expires_at),
                     r.seq, r.position
            LIMIT c.held + LEAST(%(share)s - c.held, rm.left)
            FOR UPDATE OF r SKIP LOCKED FOR SHARE OF m SKIP LOCKED
        ) d
        WHERE w.lane = rm.lane AND w.visits > 0 AND w.due_at <= %(now)s
          AND w.domain <> ALL (%(busy)s::text[]) AND c.held < %(share)s
          AND d.row_id NOT IN (SELECT k.row_id FROM kept k)
        LIMIT rm.left
    ) s
), due AS MATERIALIZED (
    SELECT row_id, message_id, address, rank, due_at, seq, position
    FROM (SELECT row_id, message_id, address, rank, due_at, seq, position FROM kept
          UNION ALL
          SELECT row_id, message_id, address, rank, due_at, seq, position FROM sought) u
    ORDER BY rank, due_at, seq, position
    LIMIT %(limit)s
)

-- name: _lease_rest
-- The rest of every lease query, after its `due` CTE (row_id, message_id, address,
-- rank, due_at, seq, position; the rows locked). With max_bytes, only the rows of the
-- messages whose sizes add up to at most max_bytes, in the lease's order (the first
-- message always, however large, when first_always: stores.base.messages_within); the
-- others are left unleased, and their data unread. Stamp those rows with our token, found again by ctid (a
-- TID scan, whatever the table's size), and return them in due order (rank first) with
-- their message, fetched by primary key: the bytes of each message on its first row
-- only, not once per recipient. Each row also carries the suppression entries in force
-- for its address and for its domain (rows.LeaseRow), so the worker needs no lookup of
-- its own: COLLATE "C" folds ASCII letters only, which equals Python's lower() on the
-- ASCII addresses it is used for; a lease with another address is looked up by the
-- worker. The entries are joined in a CTE of their own: joined in the final SELECT, they
-- made the planner nest a loop over leased_messages.
, firsts AS MATERIALIZED (
    SELECT DISTINCT ON (message_id) message_id, rank, due_at, seq, position
    FROM due
    ORDER BY message_id, rank, due_at, seq, position
), sized AS MATERIALIZED (
    SELECT f.message_id, sum(m.size) OVER w AS upto, row_number() OVER w AS n
    FROM firsts f
    JOIN messages m ON m.id = f.message_id
    WINDOW w AS (ORDER BY f.rank, f.due_at, f.seq, f.position)
), leased AS (
    UPDATE recipients r
    SET lease_token = %(token)s, lease_expires_at = %(expires_at)s
    WHERE r.ctid = ANY (ARRAY(
        SELECT row_id FROM due
        WHERE %(max_bytes)s::bigint IS NULL
           OR message_id IN (SELECT message_id FROM sized
                             WHERE upto <= %(max_bytes)s::bigint
                                OR (n = 1 AND %(first_always)s::boolean))))
    RETURNING r.message_id, r.seq, r.address, r.position, r.domain, r.attempts,
              r.first_attempt_at, r.last_attempt_at
), screened AS MATERIALIZED (
    SELECT l.*,
           sa.target AS a_target, sa.source AS a_source, sa.reply AS a_reply,
           sa.created_at AS a_created_at, sa.expires_at AS a_expires_at,
           sa.message_id AS a_message_id,
           sd.target AS d_target, sd.source AS d_source, sd.reply AS d_reply,
           sd.created_at AS d_created_at, sd.expires_at AS d_expires_at,
           sd.message_id AS d_message_id
    FROM leased l
    LEFT JOIN suppressions sa
           ON sa.target = lower(l.address COLLATE "C")
          AND (sa.expires_at IS NULL OR sa.expires_at > %(now)s
               OR sa.expires_at < '1900-01-01Z')
    LEFT JOIN suppressions sd
           ON sd.target = lower(substring(l.address FROM '[^@]*$') COLLATE "C")
          AND (sd.expires_at IS NULL OR sd.expires_at > %(now)s
               OR sd.expires_at < '1900-01-01Z')
), leased_messages AS MATERIALIZED (
    SELECT m.id, m.created_at, m.send_at, m.envelope_from, m.smtputf8, m.eightbit, m.data,
           m.require_tls, m.expires_at, m.priority, m.dsn, m.size
    FROM messages m
    WHERE m.id = ANY (ARRAY(SELECT DISTINCT message_id FROM leased))
)
-- A time outside 1900..9000 (infinity, a year past 9999, changed by hand) cannot be read
-- by the driver, and would fail the whole lease after it took every row: it is sent as
-- NULL and named in bad_times instead, and that recipient alone is failed as unreadable
-- (stores/row_checks.py).
SELECT l.message_id, l.domain, l.address, l.position, l.attempts,
       CASE WHEN l.first_attempt_at BETWEEN '1900-01-01Z' AND '9000-01-01Z'
            THEN l.first_attempt_at END AS first_attempt_at,
       -- When the message could first go: queued, or its send_at when later (the retry
       -- policy's max_age and the delay warning count from there).
       CASE WHEN m.send_at > m.created_at AND m.send_at BETWEEN '1900-01-01Z' AND '9000-01-01Z'
            THEN m.send_at
            WHEN m.created_at BETWEEN '1900-01-01Z' AND '9000-01-01Z'
            THEN m.created_at END AS created_at,
       -- When the message was queued: the Arrival-Date of its notices.
       CASE WHEN m.created_at BETWEEN '1900-01-01Z' AND '9000-01-01Z'
            THEN m.created_at END AS queued_at,
       m.envelope_from, m.smtputf8, m.eightbit,
       CASE WHEN row_number() OVER (PARTITION BY l.message_id ORDER BY l.position) = 1
            THEN m.data END AS data,
       m.require_tls,
       CASE WHEN m.expires_at BETWEEN '1900-01-01Z' AND '9000-01-01Z'
            THEN m.expires_at END AS expires_at,
       m.priority, m.dsn,
       CASE WHEN l.last_attempt_at BETWEEN '1900-01-01Z' AND '9000-01-01Z'
            THEN l.last_attempt_at END AS last_attempt_at,
       -- A suppression entry's time out of range is NULL too: unknown, and the entry
       -- still applies (an expiry out of range does not expire: see the joins above).
       l.a_target, l.a_source, l.a_reply,
       CASE WHEN l.a_created_at BETWEEN '1900-01-01Z' AND '9000-01-01Z'
            THEN l.a_created_at END AS a_created_at,
       CASE WHEN l.a_expires_at BETWEEN '1900-01-01Z' AND '9000-01-01Z'
            THEN l.a_expires_at END AS a_expires_at,
       l.a_message_id,
       l.d_target, l.d_source, l.d_reply,
       CASE WHEN l.d_created_at BETWEEN '1900-01-01Z' AND '9000-01-01Z'
            THEN l.d_created_at END AS d_created_at,
       CASE WHEN l.d_expires_at BETWEEN '1900-01-01Z' AND '9000-01-01Z'
            THEN l.d_expires_at END AS d_expires_at,
       l.d_message_id,
       m.size,
       NULLIF(concat_ws(', ',
           CASE WHEN NOT m.created_at BETWEEN '1900-01-01Z' AND '9000-01-01Z'
                THEN 'created_at ' || m.created_at END,
           CASE WHEN NOT m.expires_at BETWEEN '1900-01-01Z' AND '9000-01-01Z'
                THEN 'expires_at ' || m.expires_at END,
           CASE WHEN NOT l.first_attempt_at BETWEEN '1900-01-01Z' AND '9000-01-01Z'
                THEN 'first_attempt_at ' || l.first_attempt_at END,
           CASE WHEN NOT l.last_attempt_at BETWEEN '1900-01-01Z' AND '9000-01-01Z'
                THEN 'last_attempt_at ' || l.last_attempt_at END), '') AS bad_times,
       -- Whether max_bytes left rows out: then nothing more is leased after these.
       (SELECT count(*) FROM due) > (SELECT count(*) FROM leased) AS cut,
       -- Whether a timed suspension has ended with its recipients still aside: the store
       -- then gives these rows back, brings those back (end_suspensions) and leases again.
       EXISTS (SELECT 1 FROM suspensions WHERE until <= %(now)s) AS ended
FROM screened l
JOIN due d ON d.message_id = l.message_id AND d.address = l.address
JOIN leased_messages m ON m.id = l.message_id
ORDER BY d.rank, d.due_at, l.seq, l.position;

-- name: fail_unreadable
-- Fail, for good, leased recipients whose rows cannot be delivered (stores/row_checks.py),
-- one array element each, while the lease still holds them: leased again they would fail
-- again, in a loop. As cancel, the last reply is cleared so the reason reads as the error;
-- an attempt count or first attempt that cannot be read back is reset (the error names
-- it), so the row and its outbox event read back. The history gets the failure as an
-- attempt (not counted as one, as fail_late). Returns the (message_id, address) failed.
WITH u AS (
    SELECT *
    FROM unnest(%(message_ids)s::text[], %(addresses)s::text[], %(errors)s::text[])
         AS u(message_id, address, error)
), locked AS (
    -- Locked first, in order (see _lease_locked).
    SELECT r.message_id, r.address
    FROM recipients r
    JOIN u ON r.message_id = u.message_id AND r.address = u.address
    WHERE r.lease_token = %(token)s
    ORDER BY r.message_id, r.address
    FOR NO KEY UPDATE OF r
), updated AS (
    UPDATE recipients r
    SET state = 'failed',
        error = u.error,
        reply_code = NULL,
        reply_enhanced = NULL,
        reply_text = NULL,
        reason_class = 'other',
        uncertain = false,
        next_attempt_at = NULL,
        finished_at = %(now)s,
        last_attempt_at = %(now)s,
        first_attempt_at = CASE WHEN r.first_attempt_at BETWEEN '1900-01-01Z' AND '9000-01-01Z'
                                THEN r.first_attempt_at END,
        attempts = CASE WHEN r.attempts BETWEEN 0 AND 2147483646 THEN r.attempts ELSE 0 END,
        lease_token = NULL,
        lease_expires_at = NULL
    FROM u
    JOIN locked l ON l.message_id = u.message_id AND l.address = u.address
    WHERE r.message_id = l.message_id AND r.address = l.address
      AND r.lease_token = %(token)s
    RETURNING r.message_id, r.address, u.error
), history AS (
    INSERT INTO attempts (message_id, address, at, outcome, duration, error, uncertain,
                          reason_class)
    SELECT message_id, address, %(now)s, 'permanent', 0, error, false, 'other'
    FROM updated
    RETURNING 1
), trimmed AS (
    -- Sees the history before this statement's insert: keeps one fewer than the bound.
    DELETE FROM attempts a
    USING updated u
    WHERE a.message_id = u.message_id
      AND a.address = u.address
      AND a.id NOT IN (SELECT k.id FROM attempts k
                       WHERE k.message_id = u.message_id AND k.address = u.address
                       ORDER BY k.id DESC LIMIT %(max_history)s - 1)
    RETURNING 1
)
SELECT message_id, address FROM updated;

-- name: record
-- Results of any number of leases, one array element per result: a recipient is updated
-- only while the lease named in its own element still holds it, and the attempt history
-- gets a row for exactly those, but for a result that was no attempt (attempted false:
-- this host's own shortage, no server asked), which counts none either. A recipient past
-- the history bound loses its oldest attempts (the DELETE sees the history before this
-- statement's insert, so it keeps one fewer than the bound). Returns the recorded
-- (message_id, address, token, replayed) rows: the results may hold one recipient twice,
-- under a lease taken over and under the lease holding it now, and only the latter is
-- recorded. A result marked unanswered (a call of this store object that wrote it failed:
-- see postgres/unanswered.py) and found recorded already, to the attempt (its state, its
-- attempt's time and outcome; the state and time alone for one that was no attempt), is
-- returned with replayed true and written nothing: the answer to the statement that
-- recorded it was lost after its COMMIT (a network cut, a failover).
WITH res AS (
    SELECT *
    FROM unnest(%(tokens)s::text[], %(message_ids)s::text[], %(addresses)s::text[],
                %(states)s::text[],
                %(next_attempt_at)s::timestamptz[], %(at)s::timestamptz[],
                %(outcomes)s::text[], %(durations)s::double precision[],
                %(mx_hosts)s::text[], %(ips)s::text[], %(ports)s::integer[],
                %(tls_versions)s::text[], %(tls_ciphers)s::text[],
                %(reply_codes)s::integer[], %(reply_enhanced)s::text[],
                %(reply_texts)s::text[], %(errors)s::text[], %(uncertain)s::boolean[],
                %(reason_classes)s::text[], %(tls_policies)s::text[],
                %(unanswered)s::boolean[], %(notices)s::text[], %(attempted)s::boolean[])
         AS t(token, message_id, address, state, next_attempt_at, at, outcome, duration,
              mx_host, ip, port, tls_version, tls_cipher, reply_code, reply_enhanced,
              reply_text, error, uncertain, reason_class, tls_policy, unanswered, notice,
              attempted)
), locked AS (
    -- Every recipient named, locked in order before any is written (see _lease_locked):
    -- once per result, so twice for one named twice (the UPDATE's join then meets the
    -- same pair of rows twice, alike). The ids' ANY gives the planner an index
    -- condition: without it, it hashed a scan of every recipient.
    SELECT r.message_id, r.address
    FROM res
    JOIN recipients r ON r.message_id = res.message_id AND r.address = res.address
    WHERE r.message_id = ANY (%(message_ids)s::text[])
    ORDER BY r.message_id, r.address
    FOR NO KEY UPDATE OF r
), updated AS (
    UPDATE recipients r
    SET state = res.state,
        attempts = r.attempts + res.attempted::integer,
        first_attempt_at = COALESCE(r.first_attempt_at, res.at),
        last_attempt_at = res.at,
        next_attempt_at = CASE WHEN res.state IN ('queued', 'deferred')
                               THEN COALESCE(res.next_attempt_at, res.at) END,
        finished_at = CASE WHEN res.state IN ('delivered', 'failed') THEN res.at END,
        lease_token = NULL,
        lease_expires_at = NULL,
        reply_code = res.reply_code,
        reply_enhanced = res.reply_enhanced,
        reply_text = res.reply_text,
        error = res.error,
        mx_host = res.mx_host,
        ip = res.ip,
        tls = res.tls_version IS NOT NULL,
        uncertain = res.uncertain,
        reason_class = res.reason_class,
        -- One still on its way keeps a mark its result does not replace (a delay
        -- warning not queued yet: its message was not done).
        notice = CASE WHEN res.state IN ('queued', 'deferred')
                      THEN COALESCE(res.notice, r.notice) ELSE res.notice END
    FROM res
    JOIN locked l ON l.message_id = res.message_id AND l.address = res.address
    WHERE r.message_id = l.message_id
      AND r.address = l.address
      AND (r.lease_token = res.token
           -- Accepted by a server after an operator cancelled it (its transaction was on
           -- the wire): the mail went out, and its status must not say it never did.
           OR (res.state = 'delivered' AND r.state = 'failed' AND r.error = 'cancelled'
               AND r.lease_token IS NULL))
    RETURNING r.message_id, r.address, res.token, r.attempts, res.attempted,
              -- Final, and aside (held, or at a suspended destination): its message may
              -- have finished while held (see unhold_finished).
              r.aside AND r.state IN ('delivered', 'failed') AS finished_aside
), history AS (
    INSERT INTO attempts (message_id, address, at, outcome, duration, mx_host, ip, port,
                          tls_version, tls_cipher, reply_code, reply_enhanced, reply_text,
                          error, uncertain, reason_class, tls_policy)
    SELECT res.message_id, res.address, res.at, res.outcome, res.duration, res.mx_host, res.ip,
           res.port, res.tls_version, res.tls_cipher, res.reply_code, res.reply_enhanced,
           res.reply_text, res.error, res.uncertain, res.reason_class, res.tls_policy
    FROM res
    JOIN updated USING (message_id, address, token)
    WHERE res.attempted
    RETURNING 1
), trimmed AS (
    DELETE FROM attempts a
    USING updated u
    WHERE u.attempts > %(max_history)s
      AND u.attempted
      AND a.message_id = u.message_id
      AND a.address = u.address
      AND a.id NOT IN (SELECT k.id FROM attempts k
                       WHERE k.message_id = u.message_id AND k.address = u.address
                       ORDER BY k.id DESC LIMIT %(max_history)s - 1)
    RETURNING 1
), replayed AS (
    -- The recipients as they were before this statement: one it updates is held by the
    -- result's lease, so none is both.
    SELECT res.message_id, res.address, res.token
    FROM res
    JOIN recipients r ON r.message_id = res.message_id AND r.address = res.address
    WHERE res.unanswered
      AND r.lease_token IS DISTINCT FROM res.token
      AND r.state = res.state
      AND r.last_attempt_at = res.at
      AND (NOT res.attempted
           OR EXISTS (SELECT 1 FROM attempts a
                      WHERE a.message_id = res.message_id AND a.address = res.address
                        AND a.at = res.at AND a.outcome = res.outcome))
)
SELECT message_id, address, token, false, finished_aside FROM updated
UNION ALL
SELECT message_id, address, token, true, false FROM replayed;

-- name: unhold_finished
-- The held flag of those of the listed messages that have finished (no recipient
-- pending: delivered or failed while held, their delivery in flight), cleared after the
-- record that finished them committed. Such a message waits for no release and is
-- reported as not held; with its flag it stayed in messages_held (schema version 21)
-- until purged, read and stepped over by every held listing and count. A statement of its
-- own, after the record committed: the record locks the recipients and (but for one
-- carrying DKIM outcomes, see lock_messages) no message, and a hold or release locks the
-- message first. Its rows are the messages cleared (a statement the store fetches).
UPDATE messages m SET held = false
WHERE id = ANY (%(ids)s::text[]) AND held
  AND NOT EXISTS (SELECT 1 FROM recipients r
                  WHERE r.message_id = m.id AND r.state IN ('queued', 'deferred'))
RETURNING id;

-- name: lock_messages
-- The listed message rows, locked in id order before their recipients: first in every
-- transaction that writes both (cancel, of one message, writes it first in its
-- statement). A record carrying DKIM outcomes wrote the messages after their recipients
-- (set_dkim), and set_held locked the recipients before the message, while cancel and
-- hold_many went the other way: each waited for a row the other held, and PostgreSQL
-- aborted one ("deadlock detected"). Several messages in id order: an UPDATE meets them
-- in the order of its scan (where their rows lie, for a sequential or bitmap scan),
-- which two transactions need not share. FOR NO KEY UPDATE is the lock their UPDATE
-- takes. With PENDING, only those with a pending recipient (the operator's actions,
-- which lock no recipient of the others and write none of them but to clear a held
-- flag left): a hold of finished messages locked them, in id order, and a purge that
-- deleted them in its scan's order waited for it in a cycle.
SELECT id FROM messages m
WHERE id = ANY (%(message_ids)s::text[])
  AND (NOT %(pending)s
       OR EXISTS (SELECT 1 FROM recipients r
                  WHERE r.message_id = m.id AND r.state IN ('queued', 'deferred')))
ORDER BY id
FOR NO KEY UPDATE OF m;

-- name: set_dkim
-- The DKIM outcome of messages the worker signed anew as it sent them (a key rotated away,
-- an x= about to pass), in place of the one recorded at enqueue: status then names the
-- signatures a receiver last got. One array element per message; rare, so a statement
-- of its own, in the transaction of the record that carried them (the record alone
-- stays one statement for the rest). Every attempt of such a message carries its
-- outcome: the same one again leaves the row as it is.
UPDATE messages SET dkim = d.dkim
FROM unnest(%(message_ids)s::text[], %(dkims)s::text[]) AS d (id, dkim)
WHERE messages.id = d.id AND messages.dkim IS DISTINCT FROM d.dkim;

-- name: owed_notices
-- The recipients marked "notice owed" (the record of their result wrote the mark) of up
-- to LIMIT messages (of message_ids only, when not NULL) none of whose recipients is
-- leased or queued for a first attempt: one notice per message is made from them. A
-- recipient deferred for a later retry holds none back, nor one queued at a suspended
-- domain (it waits for its first attempt as long as the operator likes). Read on the
-- partial index of the marks, and recipients_pending_message for the rest of each message.
WITH done AS (
    SELECT DISTINCT o.seq
    FROM recipients o
    WHERE o.notice IS NOT NULL
      AND (%(message_ids)s::text[] IS NULL OR o.message_id = ANY (%(message_ids)s::text[]))
      AND NOT EXISTS (SELECT 1 FROM recipients p
                      WHERE p.seq = o.seq AND p.state IN ('queued', 'deferred')
                        AND (p.state = 'queued'
                             AND p.domain NOT IN (SELECT domain FROM suspensions)
                             OR p.lease_token IS NOT NULL))
    ORDER BY o.seq
    LIMIT %(limit)s
)
SELECT r.message_id, r.address, r.notice
FROM recipients r
JOIN done USING (seq)
WHERE r.notice IS NOT NULL
ORDER BY r.seq, r.position;

-- name: lock_notices
-- The marks about to be cleared as they are now, their rows locked until the transaction
-- ends (in one order, so two workers clearing the same marks wait rather than deadlock):
-- those of a message some of whose marks are gone or changed since they were read are
-- left as they are.
SELECT r.message_id, r.address, r.notice
FROM recipients r
JOIN unnest(%(message_ids)s::text[], %(addresses)s::text[]) AS c(message_id, address)
  ON r.message_id = c.message_id AND r.address = c.address
WHERE r.notice IS NOT NULL
ORDER BY r.message_id, r.address
FOR UPDATE OF r;

-- name: clear_notices
-- Clear the marks of the recipients whose notice is queued in this same transaction
-- (locked by lock_notices, as they were read).
UPDATE recipients r
SET notice = NULL
FROM unnest(%(message_ids)s::text[], %(addresses)s::text[]) AS c(message_id, address)
WHERE r.message_id = c.message_id
  AND r.address = c.address;

-- name: _lease_locked
-- The body of a `locked` CTE: every recipient under the lease token (those the arrays
-- name, and any the lease holds besides: the worker's own), locked in
-- (message_id, address) order, the order in which suspend, cancel, hold and resume lock
-- theirs. An UPDATE joined to an unnest writes its rows in whatever order the plan meets
-- them (here, the lease's): a worker writing b@ then a@ while an operator locked a@ then
-- b@ waited for each other, and PostgreSQL aborted one ("deadlock detected"), failing
-- the operator's command or the worker's write. Found by the token alone (the partial
-- index recipients_lease, a lease's rows): joined to the arrays, the planner read every
-- recipient, or the arrays once per row. FOR NO KEY UPDATE is the lock the UPDATE takes.
    SELECT message_id, address FROM recipients
    WHERE lease_token = %(token)s
    ORDER BY message_id, address
    FOR NO KEY UPDATE

-- name: extend
-- Counted without the recipients of held messages nor those of suspended destinations
-- (still extended: one may be on the wire): the worker gives back what it has fewer of
-- and has not started. A timed suspension counts until a lease or next_due past its end
-- deletes its row, as the other stores count it. The rows are locked first, in the
-- order of every write to many recipients (see _lease_locked).
WITH locked AS (
-- include: _lease_locked
), extended AS (
    UPDATE recipients r
    SET lease_expires_at = %(until)s
    FROM locked l
    WHERE r.message_id = l.message_id
      AND r.address = l.address
      AND r.lease_token = %(token)s
      AND (l.message_id, l.address) IN (
          SELECT * FROM unnest(%(message_ids)s::text[], %(addresses)s::text[]))
    RETURNING r.message_id, r.domain
)
SELECT count(*) FROM extended e
WHERE NOT EXISTS (SELECT 1 FROM messages m WHERE m.id = e.message_id AND m.held)
  AND NOT EXISTS (SELECT 1 FROM suspensions s WHERE s.domain = e.domain);

-- name: release
-- Locked first, in order, as extend.
WITH locked AS (
-- include: _lease_locked
), released AS (
    UPDATE recipients r
    SET lease_token = NULL, lease_expires_at = NULL
    FROM locked l
    WHERE r.message_id = l.message_id
      AND r.address = l.address
      AND r.lease_token = %(token)s
      AND (l.message_id, l.address) IN (
          SELECT * FROM unnest(%(message_ids)s::text[], %(addresses)s::text[]))
    RETURNING 1
)
SELECT pg_notify(
-- include: _channel
    , '') WHERE EXISTS (SELECT 1 FROM released);

-- name: running_backends
-- Those of the server processes a failed lease's statements were sent to that are still
-- running a statement (or in a transaction): the statement may be going on there, its
-- client gone, and lease after the give-back (see postgres/unanswered.py). Not this one
-- (a lease that failed on a connection that lived on, back in the pool), nor a process of
-- another role, which shows no state.
SELECT pid FROM pg_stat_activity
WHERE pid = ANY(%(pids)s::int[]) AND pid <> pg_backend_pid() AND state <> 'idle';

-- name: release_tokens
-- Every pending recipient still leased under one of the tokens of leases whose answer
-- never came (see postgres/unanswered.py): given back, due at once (recipients_lease
-- finds them). Returns how many. Locked first, in order (see _lease_locked).
WITH locked AS (
    SELECT message_id, address FROM recipients
    WHERE lease_token = ANY(%(tokens)s::text[])
      AND state IN ('queued', 'deferred')
    ORDER BY message_id, address
    FOR NO KEY UPDATE
), released AS (
    UPDATE recipients r
    SET lease_token = NULL, lease_expires_at = NULL
    FROM locked l
    WHERE r.message_id = l.message_id AND r.address = l.address
      AND r.lease_token = ANY(%(tokens)s::text[])
      AND r.state IN ('queued', 'deferred')
    RETURNING 1
)
SELECT count(*) FROM released;

-- name: release_holder
-- Every recipient leased under a token of one holder (tokens "<holder>.<random>"): the
-- tokens from "<holder>." up to "<holder>/", compared byte by byte. COLLATE "C", since a
-- database's linguistic collation may order or ignore punctuation otherwise; the index
-- (of the database's collation) then gives no range, but its partial WHERE makes it the
-- rows under any lease, a few per worker, which the planner reads whole. Recorded
-- recipients hold no token any more; only pending ones are given back (as by every store).
-- Locked first, in order (see _lease_locked).
WITH locked AS (
    SELECT message_id, address FROM recipients
    WHERE lease_token COLLATE "C" >= %(low)s
      AND lease_token COLLATE "C" < %(high)s
      AND state IN ('queued', 'deferred')
    ORDER BY message_id, address
    FOR NO KEY UPDATE
), released AS (
    UPDATE recipients r
    SET lease_token = NULL, lease_expires_at = NULL
    FROM locked l
    WHERE r.message_id = l.message_id AND r.address = l.address
      AND r.lease_token COLLATE "C" >= %(low)s
      AND r.lease_token COLLATE "C" < %(high)s
      AND r.state IN ('queued', 'deferred')
    RETURNING 1
)
SELECT (SELECT count(*) FROM released) AS released,
       (SELECT pg_notify(
-- include: _channel
    , '')
        WHERE EXISTS (SELECT 1 FROM released))::text AS notified;

-- name: beat_holder
-- One lease holder says it lives: its row's seen_at becomes the server's clock, and its
-- dead_after its own store URL's (the row is made, with its host and process, when it has none: the first beat, or one after others
-- took the holder for dead). Returns that time, whether the row was made, and the schema
-- version: a newer mailstrom that migrated the database meanwhile is noticed at each beat,
-- at no round trip of its own (see PostgresStore.release_dead_holders).
WITH seen AS (
    UPDATE lease_holders
    SET seen_at = pg_catalog.clock_timestamp(), stopped = false, dead_after = %(dead_after)s
    WHERE holder = %(holder)s
    RETURNING seen_at
), made AS (
    INSERT INTO lease_holders (holder, host, pid, started_at, seen_at, dead_after)
    SELECT %(holder)s, %(host)s, %(pid)s,
           pg_catalog.clock_timestamp(), pg_catalog.clock_timestamp(), %(dead_after)s
    WHERE NOT EXISTS (SELECT 1 FROM seen)
    ON CONFLICT (holder) DO UPDATE
        SET seen_at = EXCLUDED.seen_at, stopped = false, dead_after = EXCLUDED.dead_after
    RETURNING seen_at
)
SELECT seen_at, false, (SELECT max(version) FROM schema_version) FROM seen
UNION ALL
SELECT seen_at, true, (SELECT max(version) FROM schema_version) FROM made;

-- name: reap_holders
-- The holders that stopped, and (unless %(since)s is NULL) those not seen since it, nor
-- (a holder whose own dead_after is longer than the judge's, %(judge)s seconds; since is
-- that long before the server's clock) for their own dead_after, a window the judge's
-- unbroken run of looks since %(run_since)s covers whole too, other
-- than the caller's own, are gone: their rows go, and every pending recipient one of them
-- still leases is given back, due at once (the token range of release_holder, per holder).
-- A concurrent reaper waits for the rows this one deletes and then finds them gone: each
-- holder is reaped once. One row per holder: who it was, whether it had stopped, when it
-- was last seen, and how many recipients it gave back. The recipients are locked first,
-- in order (see _lease_locked).
WITH dead AS (
    DELETE FROM lease_holders
    WHERE (stopped
           OR greatest(seen_at, %(run_since)s::timestamptz)
              < %(since)s::timestamptz
                - make_interval(secs => greatest(dead_after - %(judge)s::float8, 0)))
      AND holder IS DISTINCT FROM %(own)s
    RETURNING holder, host, pid, seen_at, stopped
), locked AS (
    SELECT r.message_id, r.address, dead.holder
    FROM recipients r
    JOIN dead ON r.lease_token COLLATE "C" >= dead.holder || '.'
             AND r.lease_token COLLATE "C" < dead.holder || '/'
    WHERE r.state IN ('queued', 'deferred')
    ORDER BY r.message_id, r.address
    FOR NO KEY UPDATE OF r
), released AS (
    UPDATE recipients r
    SET lease_token = NULL, lease_expires_at = NULL
    FROM locked l
    WHERE r.message_id = l.message_id AND r.address = l.address
      AND r.lease_token COLLATE "C" >= l.holder || '.'
      AND r.lease_token COLLATE "C" < l.holder || '/'
      AND r.state IN ('queued', 'deferred')
    RETURNING l.holder
), notified AS (
    SELECT pg_notify(
-- include: _channel
    , '') WHERE EXISTS (SELECT 1 FROM released)
)
SELECT d.holder, d.host, d.pid, d.seen_at, d.stopped,
       (SELECT count(*) FROM released x WHERE x.holder = d.holder) AS released,
       (SELECT count(*) FROM notified) AS notified
FROM dead d
ORDER BY d.holder;

-- name: stop_holders
-- This store's holders closed it: the next look of any worker removes their rows, and gives
-- back what they still lease (a stop that ran out of time), without judging them first.
UPDATE lease_holders SET stopped = true WHERE holder = ANY(%(holders)s);

-- name: live_holders
-- The holders seen within %(within)s seconds by the server's clock, or their own
-- dead_after when it is longer (others do not take them for dead before), oldest first, each
-- with how many pending recipients it leases (the token range of release_holder), when
-- %(leases)s asks (0 otherwise).
SELECT h.holder, h.host, h.pid, h.started_at, h.seen_at,
       CASE WHEN %(leases)s THEN
           (SELECT count(*) FROM recipients r
            WHERE r.lease_token COLLATE "C" >= h.holder || '.'
              AND r.lease_token COLLATE "C" < h.holder || '/'
              AND r.state IN ('queued', 'deferred'))
       ELSE 0 END AS leased
FROM lease_holders h
WHERE NOT h.stopped
  AND h.seen_at >= pg_catalog.clock_timestamp()
                   - make_interval(secs => greatest(%(within)s::float8, h.dead_after))
ORDER BY h.started_at, h.holder
LIMIT %(limit)s;

-- name: _status_columns
-- A message m's columns, each of its recipients r's, the pause t of its destination and
-- one attempt a of its history (status, status_latest).
SELECT m.id, m.envelope_from, m.created_at, m.size, m.header_message_id, m.subject, m.held,
       m.dkim, m.tags, m.metadata, m.priority, m.send_at, m.expires_at, m.idempotency_key,
       r.address, r.state, r.attempts, r.reply_code, r.reply_enhanced, r.reply_text, r.error,
       r.mx_host, r.ip, r.tls, r.uncertain, r.first_attempt_at, r.last_attempt_at,
       r.next_attempt_at, r.reason_class, r.finished_at,
       (r.lease_token IS NOT NULL AND r.state IN ('queued', 'deferred')) AS leased,
       t.destination AS t_destination, t.until AS t_until, t.strikes AS t_strikes,
       t.reply AS t_reply, t.since AS t_since,
       a.at AS a_at, a.outcome AS a_outcome, a.duration AS a_duration,
       a.mx_host AS a_mx_host, a.ip AS a_ip, a.port AS a_port,
       a.tls_version AS a_tls_version, a.tls_cipher AS a_tls_cipher,
       a.reply_code AS a_reply_code, a.reply_enhanced AS a_reply_enhanced,
       a.reply_text AS a_reply_text, a.error AS a_error, a.uncertain AS a_uncertain,
       a.reason_class AS a_reason_class, a.tls_policy AS a_tls_policy

-- name: status
-- One statement, so the recipients, their history and the pause of each pending one's
-- destination (t_*, while it lasts at %(now)s) come from one snapshot.
-- include: _status_columns
FROM messages m
LEFT JOIN recipients r ON r.message_id = m.id
LEFT JOIN destination_throttles t
       ON t.destination = r.throttled_by AND r.state IN ('queued', 'deferred')
      AND t.until > %(now)s AND t.since <= %(now)s + interval '1 hour'
LEFT JOIN attempts a ON a.message_id = r.message_id AND a.address = r.address
WHERE m.id = %(id)s
ORDER BY r.position, a.id;

-- name: status_latest
-- The status query's rows for one page of the recipients (at most %(size)s, those at
-- positions past %(after)s) with each one's latest attempts only, as many as its share of
-- %(budget)s (readmodel.base.attempt_shares: the i-th of n takes budget / n, and one more
-- while i <= budget mod n), and how many its history holds (kept, at most MAX_HISTORY
-- entries of attempts_recipient counted); r_more says whether a later page exists and
-- by_state counts all the message's recipients by state, in the same snapshot. The
-- dashboard's page of a message: reading every attempt of 1,000 recipients tried 30 times
-- each took a second, and a page of all of them was 819 KB.
-- include: _status_columns
     , r.kept, r.position AS r_position, r.more AS r_more, w.by_state
FROM messages m
CROSS JOIN LATERAL (
    SELECT jsonb_object_agg(c.state, c.n) AS by_state
    FROM (SELECT c.state::text AS state, count(*) AS n FROM recipients c
          WHERE c.message_id = m.id GROUP BY c.state) c
) w
LEFT JOIN LATERAL (
    SELECT q.*, least(q.n_all, %(size)s::bigint) AS n, q.n_all > %(size)s::bigint AS more
    FROM (
        -- One more than the page, which tells whether a later page exists.
        SELECT p.*, row_number() OVER (ORDER BY p.position) AS i, count(*) OVER () AS n_all,
               (SELECT count(*) FROM attempts c
                WHERE c.message_id = p.message_id AND c.address = p.address) AS kept
        FROM (SELECT * FROM recipients r
              WHERE r.message_id = m.id AND r.position > %(after)s::bigint
              ORDER BY r.position LIMIT %(size)s::bigint + 1) p
    ) q
    WHERE q.i <= %(size)s::bigint
) r ON true
LEFT JOIN destination_throttles t
       ON t.destination = r.throttled_by AND r.state IN ('queued', 'deferred')
      AND t.until > %(now)s AND t.since <= %(now)s + interval '1 hour'
LEFT JOIN LATERAL (
    SELECT * FROM attempts a
    WHERE a.message_id = r.message_id AND a.address = r.address
    ORDER BY a.id DESC
    LIMIT %(budget)s::bigint / r.n + (r.i <= mod(%(budget)s::bigint, r.n))::int
) a ON true
WHERE m.id = %(id)s
ORDER BY r.position, a.id;

-- name: _held_filter
-- The held condition of a queue filter on messages m (_queue_filter, count), skipped
-- when its parameter is NULL. Held as reported: flagged with a pending recipient (one
-- that finished while held keeps its flag, and is no mail on hold).
      (%(held)s::boolean IS NULL
       OR (%(held)s::boolean AND m.held AND EXISTS (
               SELECT 1 FROM recipients r
               WHERE r.message_id = m.id AND r.state IN ('queued', 'deferred')))
       OR (NOT %(held)s::boolean AND NOT (m.held AND EXISTS (
               SELECT 1 FROM recipients r
               WHERE r.message_id = m.id AND r.state IN ('queued', 'deferred')))))

-- name: _in_states
-- Whether message m's derived state (mailstrom.status.derive_message_state) is one of
-- %(states)s (any, when NULL), from at most three probes of one recipient each of
-- recipients_state_seq (schema 22) or recipients_pending_message (schema 10): a
-- message with no pending or failed recipient has every one delivered (no store keeps
-- a message without one), and a pending one is deferred if one of its recipients is.
-- Worked out from every recipient, as it was, a
-- retention walk's statement over 5 messages of 2,000 recipients read 10,000 rows.
-- Each probe is a sub-select with LIMIT 1, not an EXISTS, which the planner may hash
-- by reading every recipient in the state once. The state is compared as text, as the
-- aggregate was: a CASE of booleans is guessed to match half the messages, and a list
-- by state and domain (queue --state failed --domain X) then walked every message
-- newest first, probing each (1.4 s on 400,000), not from the domain's recipients.
      AND (%(states)s::text[] IS NULL OR (CASE
               WHEN (SELECT 1 FROM recipients r
                     WHERE r.seq = m.seq AND r.state IN ('queued', 'deferred') LIMIT 1)
                    IS NOT NULL THEN
                   CASE WHEN (SELECT 1 FROM recipients r
                              WHERE r.seq = m.seq AND r.state = 'deferred' LIMIT 1)
                             IS NOT NULL THEN 'deferred'
                        ELSE 'queued' END
               WHEN (SELECT 1 FROM recipients r
                     WHERE r.seq = m.seq AND r.state = 'failed' LIMIT 1) IS NOT NULL
                   THEN 'failed'
               ELSE 'delivered'
           END) = ANY (%(states)s::text[]))

-- name: _queue_filter
-- The conditions of a queue filter on messages m (query, select_ids); each is skipped
-- when its parameter is NULL. Its state is among its states (PostgresStore's
-- _filter_params).
-- include: _held_filter
      AND (%(created_before)s::timestamptz IS NULL
           OR m.created_at < %(created_before)s::timestamptz)
      AND (%(domain)s::text IS NULL OR EXISTS (
               SELECT 1 FROM recipients r
               WHERE r.message_id = m.id AND r.domain = %(domain)s::text))
      AND (%(tag)s::text IS NULL OR m.tags @> ARRAY[%(tag)s::text])
-- include: _in_states

-- name: query
-- Walks messages newest first (index messages_newest) and stops at the limit (the
-- conditions: _queue_filter). Each pending recipient's pause (t_*) is read in the same
-- snapshot, as status reads it. The recipients of each listed message are read by the
-- primary key: a LATERAL sub-select with an ORDER BY is never pulled up into the join,
-- where a misjudged list (a generic plan's, or one before a bulk load is analyzed) read
-- every recipient of the queue, once (a hash join) or per listed message.
WITH selected AS (
    SELECT m.id, m.envelope_from, m.created_at, m.size, m.header_message_id, m.subject,
           m.held, m.seq, m.dkim, m.tags, m.metadata, m.priority, m.send_at, m.expires_at,
           m.idempotency_key
    FROM messages m
    WHERE
-- include: _queue_filter
    ORDER BY m.created_at DESC, m.seq DESC
    LIMIT %(limit)s
)
SELECT s.id, s.envelope_from, s.created_at, s.size, s.header_message_id, s.subject, s.held,
       s.dkim, s.tags, s.metadata, s.priority, s.send_at, s.expires_at, s.idempotency_key,
       r.address, r.state, r.attempts, r.reply_code, r.reply_enhanced, r.reply_text, r.error,
       r.mx_host, r.ip, r.tls, r.uncertain, r.first_attempt_at, r.last_attempt_at,
       r.next_attempt_at, r.reason_class, r.finished_at,
       (r.lease_token IS NOT NULL AND r.state IN ('queued', 'deferred')) AS leased,
       t.destination AS t_destination, t.until AS t_until, t.strikes AS t_strikes,
       t.reply AS t_reply, t.since AS t_since
FROM selected s
LEFT JOIN LATERAL (
    SELECT * FROM recipients r WHERE r.message_id = s.id ORDER BY r.position
) r ON true
LEFT JOIN destination_throttles t
       ON t.destination = r.throttled_by AND r.state IN ('queued', 'deferred')
      AND t.until > %(now)s AND t.since <= %(now)s + interval '1 hour'
ORDER BY s.created_at DESC, s.seq DESC, r.position;

-- name: retry
-- The recipients are locked first, in order (see _lease_locked), as in retry_many.
WITH found AS (
    SELECT 1 FROM messages WHERE id = %(id)s
), locked AS (
    SELECT address FROM recipients
    WHERE message_id = %(id)s AND state IN ('queued', 'deferred')
    ORDER BY address
    FOR NO KEY UPDATE
), rescheduled AS (
    UPDATE recipients r
    SET next_attempt_at = %(now)s
    FROM locked l
    WHERE r.message_id = %(id)s AND r.address = l.address
      AND r.state IN ('queued', 'deferred')
    RETURNING 1
)
SELECT (SELECT count(*) FROM found) AS found,
       (SELECT count(*) FROM rescheduled) AS changed,
       (SELECT pg_notify(
-- include: _channel
    , '')
        WHERE EXISTS (SELECT 1 FROM rescheduled))::text AS notified;

-- name: retry_deferred_span
-- retry_deferred over the deferred recipients of the next LIMIT messages by seq after
-- AFTER (a keyset walk, one short statement each: see PostgresStore.retry_deferred),
-- found through recipients_state_seq: the walk reads the deferred recipients alone, not
-- every message the queue has kept. Each message's deferred recipients are made due
-- together, locked first in order, as in retry_many. Returns the last seq looked at, how
-- many messages were looked at and how many recipients were made due; workers are woken
-- when any was.
WITH span AS (
    SELECT DISTINCT seq FROM recipients
    WHERE state = 'deferred' AND seq > %(after)s
    ORDER BY seq LIMIT %(limit)s
), locked AS (
    SELECT r.message_id, r.address FROM recipients r
    JOIN span ON r.seq = span.seq
    WHERE r.state = 'deferred'
    ORDER BY r.message_id, r.address
    FOR NO KEY UPDATE OF r
), rescheduled AS (
    UPDATE recipients r
    SET next_attempt_at = %(now)s
    FROM locked l
    WHERE r.message_id = l.message_id AND r.address = l.address AND r.state = 'deferred'
    RETURNING 1
)
SELECT (SELECT max(seq) FROM span), (SELECT count(*) FROM span),
       (SELECT count(*) FROM rescheduled),
       (SELECT pg_notify(
-- include: _channel
    , '')
        WHERE EXISTS (SELECT 1 FROM rescheduled))::text AS notified;

-- name: cancel
-- The lease is cleared too, so a worker still holding these recipients records nothing.
-- The last reply and its class are cleared so the recipient's reason reads "cancelled";
-- the history keeps every earlier reply. A delay warning owed for one (its mark) goes:
-- the operator stopped the mail. A worker that holds some of them is told: judged
-- from the rows as locked (FOR UPDATE waits for a lease being committed and reads its
-- row then), not from the statement's snapshot, which missed such a lease, so the worker
-- sent the cancelled mail.
WITH found AS (
    SELECT 1 FROM messages WHERE id = %(id)s
), unheld AS (
    -- Every pending recipient is cancelled: a held message finishes, and waits for no
    -- release (out of messages_held). Read before cancelled below, so that the message
    -- row is locked before its recipients, as set_held and hold_many lock them: the other
    -- way round, each could wait for the other.
    UPDATE messages SET held = false WHERE id = %(id)s AND held
    RETURNING 1
), locked AS (
    SELECT address, lease_token FROM recipients
    WHERE message_id = %(id)s AND state IN ('queued', 'deferred')
    ORDER BY address
    FOR UPDATE
), cancelled AS (
    UPDATE recipients r
    SET state = 'failed',
        error = 'cancelled',
        reply_code = NULL,
        reply_enhanced = NULL,
        reply_text = NULL,
        reason_class = NULL,
        uncertain = false,
        next_attempt_at = NULL,
        finished_at = %(now)s,
        lease_token = NULL,
        lease_expires_at = NULL,
        notice = NULL
    FROM locked l
    WHERE r.message_id = %(id)s AND r.address = l.address
      AND r.state IN ('queued', 'deferred')
    RETURNING r.message_id, r.address, r.seq, r.position, l.lease_token
)
SELECT (SELECT count(*) FROM found) AS found,
       (SELECT count(*) FROM unheld) AS unheld,
       (SELECT count(*) FROM cancelled) AS changed,
       (SELECT pg_notify(
-- include: _channel
    , 'cancelled')
        WHERE EXISTS (SELECT 1 FROM cancelled WHERE lease_token IS NOT NULL))::text
           AS notified,
       -- The recipients cancelled, for their outbox events (append_cancel_events), in
       -- enqueue order as the other stores write them.
       ARRAY(SELECT message_id FROM cancelled WHERE %(events)s ORDER BY seq, position)
           AS message_ids,
       ARRAY(SELECT address FROM cancelled WHERE %(events)s ORDER BY seq, position)
           AS addresses;

-- name: set_held
-- A worker that leased a message now held is told, as of a cancel: it gives back what it
-- has not started. Judged from the rows as locked, as cancel does: a lease being
-- committed is waited for and seen, and a later one skips the rows until this commits.
-- The pending recipients are set aside (schema version 20) while it is held; released,
-- they are back unless their destination is suspended (its row locked FOR KEY SHARE
-- before, by lock_suspensions_of in the same transaction: see there). A hold keeps
-- pending recipients from leases: a message with none (finished) is not held. A release
-- wakes the workers only for pending mail that was held: one that finished while held
-- waited for nothing (its flag goes all the same).
WITH found AS (
    SELECT held FROM messages WHERE id = %(id)s
), changed AS (
    UPDATE messages m SET held = %(held)s
    WHERE id = %(id)s
      AND (NOT %(held)s OR EXISTS (SELECT 1 FROM recipients r
                                   WHERE r.message_id = m.id
                                     AND r.state IN ('queued', 'deferred')))
    RETURNING 1
), locked AS (
    SELECT address, lease_token FROM recipients
    WHERE message_id = %(id)s AND state IN ('queued', 'deferred')
    ORDER BY address
    FOR UPDATE
), moved AS (
    UPDATE recipients r
    SET aside = CASE WHEN %(held)s THEN true
                     ELSE EXISTS (SELECT 1 FROM suspensions s WHERE s.domain = r.domain) END
    FROM locked l
    WHERE r.message_id = %(id)s AND r.address = l.address AND r.aside <> %(held)s
)
SELECT (SELECT count(*) FROM found) AS found,
       (SELECT pg_notify(
-- include: _channel
    , '')
        WHERE NOT %(held)s AND EXISTS (SELECT 1 FROM found WHERE held)
          AND EXISTS (SELECT 1 FROM locked))::text AS notified,
       (SELECT pg_notify(
-- include: _channel
    , 'cancelled')
        WHERE %(held)s AND EXISTS (SELECT 1 FROM locked WHERE lease_token IS NOT NULL)
          AND EXISTS (SELECT 1 FROM changed))::text AS told;

-- name: purge_span
-- purge and purge_state (a state given), over the next LIMIT messages by id after AFTER
-- (a keyset walk, one short statement each: see PostgresStore.purge). A message goes when
-- none of its recipients is pending or finished at or after the cutoff, or final without
-- a finish time (a row changed by hand: not known to have finished before it, as
-- purge_many and the other stores judge), nor owes a notice (its mark left: the worker
-- stopped before queuing it, and makes it of the message; deleted, the sender was never
-- told). With a state, only one whose derived state it is: delivered (every recipient
-- delivered) or failed (every recipient final, one at least failed). Returns the last id
-- looked at, how many were looked at and how many went.
WITH span AS (
    SELECT id FROM messages WHERE id > %(after)s ORDER BY id LIMIT %(limit)s
), purged AS (
    DELETE FROM messages m
    USING span
    WHERE m.id = span.id
      AND NOT EXISTS (
        SELECT 1 FROM recipients r
        WHERE r.message_id = m.id
          AND (r.state IN ('queued', 'deferred')
               OR r.notice IS NOT NULL
               OR r.finished_at IS NULL
               OR r.finished_at >= %(finished_before)s))
      AND (%(state)s::text IS NULL
           OR EXISTS (SELECT 1 FROM recipients r WHERE r.message_id = m.id)
              AND %(state)s::text = CASE WHEN EXISTS (
                SELECT 1 FROM recipients r WHERE r.message_id = m.id AND r.state = 'failed')
                THEN 'failed' ELSE 'delivered' END)
    RETURNING 1
)
SELECT (SELECT max(id) FROM span), (SELECT count(*) FROM span), (SELECT count(*) FROM purged);

-- name: next_due
-- Suspended destinations are left out; the end of a timed suspension counts as a due
-- time (LEAST ignores NULLs). The recipients of a suspended destination or a held message
-- are aside (schema version 20), out of recipients_due: this reads the first entry of
-- that index (the filters stay for a row queued as a suspension began, not yet aside;
-- NOT IN for the reason the lease gives).
-- `ended` says a timed suspension has ended with its recipients still aside: the store
-- brings them back (end_suspensions) and asks again. A pending recipient without a due
-- time (no next attempt and no lease: a row changed by hand) sorts last in
-- recipients_due and is never leased: `undated` says there is one (a probe of the index's
-- NULL entries), and the store makes it due (date_undated).
SELECT LEAST(
    (SELECT GREATEST(r.next_attempt_at, r.lease_expires_at)
     FROM recipients r
     JOIN messages m ON m.id = r.message_id
     WHERE r.state IN ('queued', 'deferred') AND NOT r.aside AND NOT m.held
       AND r.domain NOT IN (SELECT s.domain FROM suspensions s
                            WHERE s.until IS NULL OR s.until > %(now)s)
     ORDER BY GREATEST(r.next_attempt_at, r.lease_expires_at)
     LIMIT 1),
    (SELECT min(until) FROM suspensions WHERE until > %(now)s)) AS due_at,
    EXISTS (SELECT 1 FROM recipients r
            WHERE r.state IN ('queued', 'deferred') AND NOT r.aside
              AND GREATEST(r.next_attempt_at, r.lease_expires_at) IS NULL) AS undated,
    EXISTS (SELECT 1 FROM suspensions WHERE until <= %(now)s) AS ended;

-- name: date_undated
-- Pending recipients without a due time (see next_due) made due now: nothing else is
-- wrong with them, and the next lease delivers them. Those aside are dated once back.
-- Locked first, in order (see _lease_locked).
WITH locked AS (
    SELECT message_id, address FROM recipients
    WHERE state IN ('queued', 'deferred') AND NOT aside
      AND GREATEST(next_attempt_at, lease_expires_at) IS NULL
    ORDER BY message_id, address
    FOR NO KEY UPDATE
)
UPDATE recipients r SET next_attempt_at = %(now)s
FROM locked l
WHERE r.message_id = l.message_id AND r.address = l.address
  AND r.state IN ('queued', 'deferred') AND NOT r.aside
  AND GREATEST(r.next_attempt_at, r.lease_expires_at) IS NULL;

-- name: stats
SELECT 'state' AS kind, state AS key, count(*) AS n FROM recipients GROUP BY state
UNION ALL
SELECT 'domain', domain, count(*) FROM recipients
WHERE state IN ('queued', 'deferred') GROUP BY domain
UNION ALL
SELECT 'messages', NULL, count(*) FROM messages
UNION ALL
-- Held messages still waiting: one cancelled (or finished) while held keeps its flag.
SELECT 'held', NULL, count(*) FROM messages m
WHERE held AND EXISTS (SELECT 1 FROM recipients r
                       WHERE r.seq = m.seq AND r.state IN ('queued', 'deferred'));

-- name: append_events
-- The outbox rows of results just recorded, copied from the recipients' rows, in the
-- order of the arrays. Runs in the record statement's transaction (see PostgresStore.record).
--
-- Event ids must become visible in id order: a reader pages with read_events(after=) and
-- would never see an id below one it already had. Ids come from a sequence when a row is
-- inserted and transactions commit in any order, so the ids are drawn under a
-- transaction-level advisory lock, taken here before the first row (and its id) is made
-- and held until this transaction has committed or rolled back: the event-writing
-- transactions of all workers commit one after the other. The lock is taken last in its
-- transaction and nothing is waited for while it is held, so it cannot deadlock.
-- include: _event_insert
SELECT r.message_id, r.address, r.state, r.attempts, r.last_attempt_at, r.next_attempt_at,
-- include: _event_rows
ORDER BY t.n;

-- name: append_cancel_events
-- As append_events, for recipients a cancel just failed (in its transaction, after its
-- statement): the event's time is the cancel's (finished_at), as one never attempted has
-- no attempt time.
-- include: _event_insert
SELECT r.message_id, r.address, r.state, r.attempts, r.finished_at, r.next_attempt_at,
-- include: _event_rows
ORDER BY t.n;

-- name: _event_insert
-- The head of append_events and append_cancel_events: the id-order lock, then the insert.
WITH turn AS MATERIALIZED (SELECT pg_advisory_xact_lock(x'6d73746d6576656e'::bigint))
INSERT INTO events (message_id, address, state, attempt, at, next_attempt_at, reply_code,
                    reply_enhanced, reply_text, error, reason_class, mx_host, ip, tls,
                    uncertain, tags, metadata)

-- name: _event_rows
-- The rest of their SELECT, after its first line (which says when the event was): the
-- recipients named (the query orders them as given: ORDER BY t.n).
       r.reply_code, r.reply_enhanced, r.reply_text, r.error, r.reason_class, r.mx_host,
       r.ip, r.tls, r.uncertain, m.tags, m.metadata
FROM turn,
     unnest(%(message_ids)s::text[], %(addresses)s::text[]) WITH ORDINALITY
     AS t(message_id, address, n)
JOIN recipients r ON r.message_id = t.message_id AND r.address = t.address
JOIN messages m ON m.id = r.message_id

-- name: lease_events
-- Unsent events not under an unexpired lease, oldest first; rows another sender is
-- leasing right now are skipped.
WITH due AS (
    SELECT id FROM events
    WHERE sent_at IS NULL
      AND (lease_expires_at IS NULL OR lease_expires_at <= %(now)s)
    ORDER BY id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
UPDATE events e
SET lease_token = %(token)s, lease_expires_at = %(expires_at)s
FROM due
WHERE e.id = due.id
RETURNING e.id, e.at, e.message_id, e.address, e.state, e.attempt, e.reply_code,
          e.reply_enhanced, e.reply_text, e.error, e.reason_class, e.mx_host, e.ip, e.tls,
          e.uncertain, e.next_attempt_at, e.tags, e.metadata;

-- name: skip_events
-- Events of a lease that cannot be read, marked sent (side_rows.EVENT_SKIPPED).
WITH skipped AS (
    UPDATE events
    SET sent_at = %(now)s, lease_token = NULL, lease_expires_at = NULL
    WHERE id = ANY(%(ids)s::bigint[]) AND lease_token = %(token)s
    RETURNING 1
)
SELECT count(*) FROM skipped;

-- name: ack_events
-- The batch's events only (ids): a sender may acknowledge part of what it leased.
WITH acked AS (
    UPDATE events
    SET sent_at = %(now)s, lease_token = NULL, lease_expires_at = NULL
    WHERE lease_token = %(token)s AND id = ANY(%(ids)s::bigint[])
    RETURNING 1
)
SELECT count(*) FROM acked;

-- name: release_events
WITH released AS (
    UPDATE events SET lease_token = NULL, lease_expires_at = NULL
    WHERE lease_token = %(token)s AND id = ANY(%(ids)s::bigint[])
    RETURNING 1
)
SELECT count(*) FROM released;

-- name: read_events
SELECT id, at, message_id, address, state, attempt, reply_code, reply_enhanced, reply_text,
       error, reason_class, mx_host, ip, tls, uncertain, next_attempt_at, tags, metadata
FROM events
WHERE id > %(after)s
ORDER BY id
LIMIT %(limit)s;

-- name: last_event_id
SELECT coalesce(max(id), 0) FROM events;

-- name: unsent_events
-- A hook's backlog: the partial index events_unsent holds exactly these rows.
SELECT count(*) FROM events WHERE sent_at IS NULL;

-- name: prune_events_span
-- prune_events over the next LIMIT events by id after AFTER (a keyset walk, one short
-- statement each: see PostgresStore.prune_events). Returns the last id looked at, how
-- many were looked at and how many went.
WITH span AS (
    SELECT id FROM events WHERE id > %(after)s ORDER BY id LIMIT %(limit)s
), pruned AS (
    DELETE FROM events e
    USING span
    WHERE e.id = span.id
      AND (e.sent_at < %(sent_before)s
           OR (e.sent_at IS NULL AND e.at < %(unsent_before)s::timestamptz))
    RETURNING 1
)
SELECT (SELECT max(id) FROM span), (SELECT count(*) FROM span), (SELECT count(*) FROM pruned);

-- name: select_ids
-- The ids query lists, in its order, each with its place in it (select_page): with a
-- place given (after_created, after_seq), only those below it, a range of
-- messages_newest that the walk starts from.
SELECT m.id, m.created_at, m.seq
FROM messages m
WHERE
-- include: _queue_filter
      AND (%(after_created)s::timestamptz IS NULL
           OR (m.created_at, m.seq) < (%(after_created)s::timestamptz, %(after_seq)s::bigint))
ORDER BY m.created_at DESC, m.seq DESC
LIMIT %(limit)s;

-- name: select_window
-- select_ids looking at no more than %(examine)s messages: those queued before
-- created_before (all when it is NULL) below the place given, newest first, a range of
-- messages_newest read once (examined, materialized: named twice), and the ids among
-- them the filter lists. A row with a NULL id closes the answer: the place of the
-- oldest message looked at, and how many were. Sparse matches among many kept messages
-- (a little failed mail past its retention behind a million delivered ones kept) were
-- looked for in one statement, which a statement_timeout cancelled at each try.
WITH examined AS (
    SELECT m.id, m.created_at, m.seq, m.held, m.tags
    FROM messages m
    WHERE (%(created_before)s::timestamptz IS NULL
           OR m.created_at < %(created_before)s::timestamptz)
      AND (%(after_created)s::timestamptz IS NULL
           OR (m.created_at, m.seq) < (%(after_created)s::timestamptz, %(after_seq)s::bigint))
    ORDER BY m.created_at DESC, m.seq DESC
    LIMIT %(examine)s
), listed AS (
    SELECT m.id, m.created_at, m.seq
    FROM examined m
    WHERE
-- include: _queue_filter
    ORDER BY m.created_at DESC, m.seq DESC
    LIMIT %(limit)s
)
SELECT l.id, l.created_at, l.seq, NULL::bigint AS examined
FROM listed l
UNION ALL
SELECT NULL, o.created_at, o.seq, (SELECT count(*) FROM examined)
FROM (SELECT 1) one
LEFT JOIN LATERAL (
    SELECT e.created_at, e.seq FROM examined e ORDER BY e.created_at, e.seq LIMIT 1
) o ON true;

-- name: ids_with_prefix
-- A range on the primary key; the left() test keeps the answer exact whatever the
-- database's collation makes of the range.
SELECT id FROM messages
WHERE id >= %(prefix)s AND id < %(upper)s AND left(id, length(%(prefix)s)) = %(prefix)s
ORDER BY id
LIMIT %(limit)s;

-- name: count
-- How many messages match the queue filter (as in query), reading at most cap of them.
SELECT count(*) FROM (
    SELECT 1
    FROM messages m
    WHERE
-- include: _held_filter
      AND (%(created_before)s::timestamptz IS NULL
           OR m.created_at < %(created_before)s::timestamptz)
      AND (%(domain)s::text IS NULL OR EXISTS (
               SELECT 1 FROM recipients r
               WHERE r.message_id = m.id AND r.domain = %(domain)s::text))
      AND (NOT %(pending)s::boolean OR EXISTS (
               SELECT 1 FROM recipients r
               WHERE r.message_id = m.id AND r.state IN ('queued', 'deferred')))
-- include: _in_states
      AND (%(tag)s::text IS NULL OR m.tags @> ARRAY[%(tag)s::text])
    LIMIT %(cap)s
) AS matching;

-- name: retry_many
-- Locked first, in the order the worker's writes and the other commands lock recipients
-- (see _lease_locked): the UPDATE alone wrote them in the order of its plan's scan.
WITH locked AS (
    SELECT message_id, address FROM recipients
    WHERE message_id = ANY (%(ids)s::text[]) AND state IN ('queued', 'deferred')
    ORDER BY message_id, address
    FOR NO KEY UPDATE
), rescheduled AS (
    UPDATE recipients r
    SET next_attempt_at = %(now)s
    FROM locked l
    WHERE r.message_id = l.message_id AND r.address = l.address
      AND r.state IN ('queued', 'deferred')
    RETURNING 1
)
SELECT (SELECT count(*) FROM rescheduled) AS changed,
       (SELECT pg_notify(
-- include: _channel
    , '')
        WHERE EXISTS (SELECT 1 FROM rescheduled))::text AS notified;

-- name: cancel_many
-- As cancel: the lease, the last reply and the mark are cleared, and workers told of leased ones
-- (judged from the rows as locked); the held ones finish, unheld, their rows locked first.
WITH unheld AS (
    UPDATE messages SET held = false WHERE id = ANY (%(ids)s::text[]) AND held
    RETURNING 1
), locked AS (
    SELECT message_id, address, lease_token FROM recipients
    WHERE message_id = ANY (%(ids)s::text[]) AND state IN ('queued', 'deferred')
    ORDER BY message_id, address
    FOR UPDATE
), cancelled AS (
    UPDATE recipients r
    SET state = 'failed',
        error = 'cancelled',
        reply_code = NULL,
        reply_enhanced = NULL,
        reply_text = NULL,
        reason_class = NULL,
        uncertain = false,
        next_attempt_at = NULL,
        finished_at = %(now)s,
        lease_token = NULL,
        lease_expires_at = NULL,
        notice = NULL
    FROM locked l
    WHERE r.message_id = l.message_id AND r.address = l.address
      AND r.state IN ('queued', 'deferred')
    RETURNING r.message_id, r.address, r.seq, r.position, l.lease_token
)
SELECT (SELECT count(*) FROM unheld) AS unheld,
       (SELECT count(*) FROM cancelled) AS changed,
       (SELECT pg_notify(
-- include: _channel
    , 'cancelled')
        WHERE EXISTS (SELECT 1 FROM cancelled WHERE lease_token IS NOT NULL))::text
           AS notified,
       ARRAY(SELECT message_id FROM cancelled WHERE %(events)s ORDER BY seq, position)
           AS message_ids,
       ARRAY(SELECT address FROM cancelled WHERE %(events)s ORDER BY seq, position)
           AS addresses;

-- name: hold_many
-- As set_held: a worker that leased a message now held is told (judged from the rows as
-- locked), and the pending recipients are set aside or brought back. A message with no
-- pending recipient (finished) is not held; released, one that finished while held loses
-- its flag uncounted (no mail waited for that release).
WITH changed AS (
    UPDATE messages m SET held = %(held)s
    WHERE id = ANY (%(ids)s::text[]) AND held <> %(held)s
      AND (NOT %(held)s OR EXISTS (SELECT 1 FROM recipients r
                                   WHERE r.message_id = m.id
                                     AND r.state IN ('queued', 'deferred')))
    RETURNING id, EXISTS (SELECT 1 FROM recipients r
                          WHERE r.message_id = m.id
                            AND r.state IN ('queued', 'deferred')) AS waiting
), locked AS (
    SELECT message_id, address, lease_token FROM recipients
    WHERE message_id = ANY (%(ids)s::text[])
      AND state IN ('queued', 'deferred')
    ORDER BY message_id, address
    FOR UPDATE
), moved AS (
    UPDATE recipients r
    SET aside = CASE WHEN %(held)s THEN true
                     ELSE EXISTS (SELECT 1 FROM suspensions s WHERE s.domain = r.domain) END
    FROM locked l
    WHERE r.message_id = l.message_id AND r.address = l.address AND r.aside <> %(held)s
)
SELECT (SELECT count(*) FROM changed WHERE waiting) AS changed,
       (SELECT pg_notify(
-- include: _channel
    , '')
        WHERE NOT %(held)s AND EXISTS (SELECT 1 FROM changed WHERE waiting))::text AS notified,
       (SELECT pg_notify(
-- include: _channel
    , 'cancelled')
        WHERE %(held)s AND EXISTS (SELECT 1 FROM locked WHERE lease_token IS NOT NULL)
          AND EXISTS (SELECT 1 FROM changed))::text AS told;

-- name: purge_many
-- The listed messages none of whose recipients is pending or (with a cutoff) finished
-- at or after it; with a state, only those in it (as purge_state).
WITH purged AS (
    DELETE FROM messages m
    WHERE m.id = ANY (%(ids)s::text[])
      AND NOT EXISTS (
        SELECT 1 FROM recipients r
        WHERE r.message_id = m.id
          AND (r.state IN ('queued', 'deferred')
               OR r.notice IS NOT NULL
               OR r.finished_at IS NULL
               OR (%(finished_before)s::timestamptz IS NOT NULL
                   AND r.finished_at >= %(finished_before)s::timestamptz)))
      -- The derived state of a finished message, compared with the one asked for: a
      -- pending one matches none (as a flag, it read as failed).
      AND (%(state)s::text IS NULL OR %(state)s::text = CASE WHEN EXISTS (
        SELECT 1 FROM recipients r WHERE r.message_id = m.id AND r.state = 'failed')
        THEN 'failed' ELSE 'delivered' END)
    RETURNING 1
)
SELECT count(*) FROM purged;

-- name: shape
-- Pending recipients per domain and age bucket of their message; edges are the bucket
-- boundaries as seconds, ascending.
SELECT r.domain,
       (SELECT count(*) FROM unnest(%(edges)s::double precision[]) AS e(edge)
        WHERE extract(epoch FROM (%(now)s::timestamptz - m.created_at)) >= e.edge) AS bucket,
       count(*)
FROM recipients r
JOIN messages m ON m.id = r.message_id
WHERE r.state IN ('queued', 'deferred')
GROUP BY 1, 2;

-- name: message_data
SELECT data FROM messages WHERE id = %(id)s;

-- name: suspend
-- The destination's pending recipients are set aside (schema version 20): out of the due
-- indexes, so that no lease or next_due walks past them. Locked in the order cancel and
-- hold lock recipients. One queued as this runs may stay in the index (its enqueue read
-- no suspension yet, and this statement's snapshot has no such row): the lease's filters
-- keep it waiting all the same, and resume finds nothing of it to bring back. A worker
-- that leased some of them is told, as of a cancel (judged from the rows as locked, as
-- cancel judges): extend no longer counts them, and it gives back what it has not
-- started.
WITH suspended AS (
    INSERT INTO suspensions (domain, suspended_at, until)
    VALUES (%(domain)s, %(now)s, %(until)s)
    ON CONFLICT (domain) DO UPDATE SET suspended_at = excluded.suspended_at,
                                       until = excluded.until
    RETURNING 1
), locked AS (
    SELECT message_id, address, lease_token FROM recipients
    WHERE domain = %(domain)s AND state IN ('queued', 'deferred') AND NOT aside
    ORDER BY message_id, address
    FOR UPDATE
), set_aside AS (
    UPDATE recipients r SET aside = true
    FROM locked l
    WHERE r.message_id = l.message_id AND r.address = l.address AND NOT r.aside
    RETURNING 1
)
SELECT (SELECT count(*) FROM suspended), (SELECT count(*) FROM set_aside),
       (SELECT pg_notify(
-- include: _channel
    , 'cancelled')
        WHERE EXISTS (SELECT 1 FROM locked WHERE lease_token IS NOT NULL))::text AS told;

-- name: lock_suspension
-- The first statement of resume's transaction: its suspension locked (FOR UPDATE waits
-- for every enqueue and release that read it FOR KEY SHARE to commit; those that come
-- after wait for this transaction, and then find the row gone), and whether it was in
-- force at now (a timed suspension that has ended was no suspension: not found).
-- end_suspensions follows.
SELECT until IS NULL OR until > %(now)s FROM suspensions
WHERE domain = %(domain)s
FOR UPDATE;

-- name: lock_ended
-- The first statement of the transaction that ends the timed suspensions that have ended
-- by now (and still have their rows): locked as lock_suspension locks one, in domain
-- order. A suspension given a later end meanwhile is rechecked and left alone.
-- end_suspensions follows.
SELECT domain FROM suspensions
WHERE until <= %(now)s
ORDER BY domain
FOR UPDATE;

-- name: ended_suspensions
-- Whether a timed suspension has ended by now with its row (and its recipients aside)
-- still there: an empty lease asks, so that it takes them once they are back.
SELECT EXISTS (SELECT 1 FROM suspensions WHERE until <= %(now)s);

-- name: end_suspensions
-- Delete the suspensions of domains (locked by lock_suspension or lock_ended, the
-- previous statement of this transaction) and bring their pending recipients back into
-- the due indexes, but for those of held messages. A statement of its own, after the
-- lock: its snapshot holds every recipient that the enqueues the lock waited for queued
-- there (set aside, having read the suspension), which a snapshot taken before the lock
-- missed, leaving them aside for good. Recipients are locked in the order cancel and
-- hold lock them. Wakes the workers (NOTIFY) when wake is true or recipients came back.
-- A release locks the suspension FOR KEY SHARE before any recipient (lock_suspensions_of):
-- one under way was waited for, and its recipients are read here as released and aside;
-- one that comes later waits for this transaction and then finds no suspension.
WITH ended AS (
    DELETE FROM suspensions WHERE domain = ANY (%(domains)s::text[])
), locked AS (
    SELECT r.message_id, r.address FROM recipients r
    WHERE r.domain = ANY (%(domains)s::text[])
      AND r.state IN ('queued', 'deferred') AND r.aside
      AND NOT EXISTS (SELECT 1 FROM messages m WHERE m.id = r.message_id AND m.held)
    ORDER BY r.message_id, r.address
    FOR UPDATE OF r
), back AS (
    UPDATE recipients r SET aside = false
    FROM locked l
    WHERE r.message_id = l.message_id AND r.address = l.address AND r.aside
    RETURNING 1
)
SELECT (SELECT count(*) FROM back) AS back,
       (SELECT pg_notify(
-- include: _channel
    , '')
        WHERE %(wake)s OR EXISTS (SELECT 1 FROM back))::text AS notified;

-- name: lock_suspensions_of
-- The first statement of a release's transaction (set_held, hold_many with held false):
-- the suspensions of the destinations of these messages' pending recipients, locked FOR
-- KEY SHARE in domain order. A resume or an end then waits for the release to commit,
-- and finds its recipients left aside (their destination was suspended) to bring back;
-- one that went first has deleted the row, and the release brings them back itself.
-- Taken before the release locks any recipient, as resume takes its lock before its
-- recipients': the other way round, each could wait for the other.
SELECT s.domain FROM suspensions s
WHERE s.domain IN (SELECT r.domain FROM recipients r
                   WHERE r.message_id = ANY (%(ids)s::text[])
                     AND r.state IN ('queued', 'deferred'))
ORDER BY s.domain
FOR KEY SHARE OF s;

-- name: suspensions
-- By code point, as the other stores list them, whatever the database's collation (one
-- that ignores punctuation put mail-relay.example after mailgun.example).
SELECT domain, suspended_at, until FROM suspensions
WHERE until IS NULL OR until > %(now)s
ORDER BY domain COLLATE "C";

-- name: shaping_lock
-- Serialises the workers updating one pause or bucket (a row that may not exist yet cannot
-- be locked with FOR UPDATE); held until the transaction ends.
SELECT pg_advisory_xact_lock(hashtextextended(%(key)s, 7));

-- name: forget_throttles
DELETE FROM destination_throttles WHERE until < %(before)s;

-- name: get_throttle
SELECT destination, until, strikes, reply, since
FROM destination_throttles
WHERE destination = %(destination)s;

-- name: put_throttle
INSERT INTO destination_throttles (destination, until, strikes, reply, since)
VALUES (%(destination)s, %(until)s, %(strikes)s, %(reply)s, %(since)s)
ON CONFLICT (destination) DO UPDATE
SET until = EXCLUDED.until, strikes = EXCLUDED.strikes, reply = EXCLUDED.reply,
    since = EXCLUDED.since;

-- name: throttles
-- A pause that runs (policy.throttle.pause_runs): not ended, and not started more than
-- CLOCK_SET_BACK (an hour) ahead, by a clock since set back. So in status and paused_in.
SELECT destination, until, strikes, reply, since
FROM destination_throttles
WHERE until > %(now)s AND since <= %(now)s + interval '1 hour'
ORDER BY until, destination COLLATE "C";

-- name: throttle_count
-- The running pauses of throttles, counted (the dashboard lists the first few).
SELECT count(*)
FROM destination_throttles
WHERE until > %(now)s AND since <= %(now)s + interval '1 hour';

-- name: paused_in
SELECT r.message_id, r.address, t.destination, t.until, t.strikes, t.reply, t.since
FROM recipients r
JOIN destination_throttles t ON t.destination = r.throttled_by
WHERE r.message_id = ANY(%(ids)s::text[])
  AND r.state IN ('queued', 'deferred')
  AND t.until > %(now)s AND t.since <= %(now)s + interval '1 hour';

-- name: postpone
-- Locked first, in order, as extend (the rows under the elements' tokens).
WITH locked AS (
    SELECT message_id, address FROM recipients
    WHERE lease_token = ANY (%(tokens)s::text[])
    ORDER BY message_id, address
    FOR NO KEY UPDATE
), postponed AS (
    UPDATE recipients r
    SET lease_token = NULL, lease_expires_at = NULL, next_attempt_at = %(until)s,
        throttled_by = %(destination)s
    FROM unnest(%(message_ids)s::text[], %(addresses)s::text[], %(tokens)s::text[])
        AS t(message_id, address, token)
    JOIN locked l ON l.message_id = t.message_id AND l.address = t.address
    WHERE r.message_id = l.message_id
      AND r.address = l.address
      AND r.lease_token = t.token
    RETURNING 1
)
SELECT count(*) FROM postponed;

-- name: get_buckets
SELECT key, tokens, at FROM shaping_buckets WHERE key = ANY(%(keys)s::text[]);

-- name: put_buckets
INSERT INTO shaping_buckets (key, tokens, at)
SELECT * FROM unnest(%(keys)s::text[], %(tokens)s::float8[], %(ats)s::timestamptz[])
ON CONFLICT (key) DO UPDATE SET tokens = EXCLUDED.tokens, at = EXCLUDED.at;

-- name: mark_throttled
-- Locked first, in order (see _lease_locked).
WITH locked AS (
    SELECT r.message_id, r.address
    FROM recipients r
    JOIN unnest(%(message_ids)s::text[], %(addresses)s::text[]) AS t(message_id, address)
      ON r.message_id = t.message_id AND r.address = t.address
    ORDER BY r.message_id, r.address
    FOR NO KEY UPDATE OF r
)
UPDATE recipients r
SET throttled_by = %(destination)s
FROM locked l
WHERE r.message_id = l.message_id AND r.address = l.address;
-- name: mta_sts_policy
SELECT domain, policy_id, mode, mx, max_age, policy_text, fetched_at, expires_at
FROM mta_sts_policies WHERE domain = %(domain)s;

-- name: prune_mta_sts_policies
-- Policies expired at or before expired_before, soonest first, found on
-- mta_sts_policies_expiry (schema version 28); a row another session is writing (a fresh
-- fetch saving over it) is skipped and left for a later call.
WITH doomed AS (
    SELECT domain FROM mta_sts_policies
    WHERE expires_at <= %(expired_before)s
    ORDER BY expires_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), pruned AS (
    DELETE FROM mta_sts_policies p USING doomed WHERE p.domain = doomed.domain RETURNING 1
)
SELECT count(*) FROM pruned;

-- name: save_mta_sts_policy
INSERT INTO mta_sts_policies (domain, policy_id, mode, mx, max_age, policy_text,
                              fetched_at, expires_at)
VALUES (%(domain)s, %(policy_id)s, %(mode)s, %(mx)s, %(max_age)s, %(policy_text)s,
        %(fetched_at)s, %(expires_at)s)
ON CONFLICT (domain) DO UPDATE SET
    policy_id = EXCLUDED.policy_id, mode = EXCLUDED.mode, mx = EXCLUDED.mx,
    max_age = EXCLUDED.max_age, policy_text = EXCLUDED.policy_text,
    fetched_at = EXCLUDED.fetched_at, expires_at = EXCLUDED.expires_at
RETURNING 1;

-- name: add_tls_sessions
INSERT INTO tls_sessions AS t (day, policy_domain, policy_type, policy_hash, policy_string,
                               result_type, sending_ip, receiving_mx, receiving_ip,
                               failure_code, count)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (day, policy_domain, policy_type, policy_hash, result_type, sending_ip,
             receiving_mx, receiving_ip, failure_code)
DO UPDATE SET count = t.count + EXCLUDED.count;

-- name: tls_sessions
SELECT day, policy_domain, policy_type, policy_hash, policy_string, result_type, sending_ip,
       receiving_mx, receiving_ip, failure_code, count
FROM tls_sessions WHERE day = %(day)s
ORDER BY policy_domain, result_type, receiving_mx;

-- name: prune_tls_sessions
WITH pruned AS (
    DELETE FROM tls_sessions WHERE day < %(before)s RETURNING 1
)
SELECT count(*) FROM pruned;

-- name: claim_tls_report
-- A row back when the key was free (or its hold had ended) and is now this run's; none
-- when another run holds it. Other holds ended are deleted on the way.
WITH pruned AS (
    DELETE FROM tls_report_claims WHERE until <= %(now)s AND key <> %(key)s
)
INSERT INTO tls_report_claims AS c (key, until) VALUES (%(key)s, %(until)s)
ON CONFLICT (key) DO UPDATE SET until = excluded.until WHERE c.until <= %(now)s
RETURNING 1;

-- name: hold_tls_report
INSERT INTO tls_report_claims (key, until) VALUES (%(key)s, %(until)s)
ON CONFLICT (key) DO UPDATE SET until = excluded.until;

-- name: note_tls_broken
INSERT INTO tls_broken (host, until, reason, noted_at)
VALUES (%(host)s, %(until)s, %(reason)s, %(now)s)
ON CONFLICT (host) DO UPDATE
    SET until = greatest(tls_broken.until, excluded.until),
        reason = excluded.reason,
        noted_at = excluded.noted_at
RETURNING 1;

-- name: tls_broken
-- An end past 9000 (infinity, changed by hand) would never expire: it is forgotten here,
-- and returned once as NULL for the store to say so (side_rows.broken_until).
WITH expired AS (
    DELETE FROM tls_broken WHERE until <= %(now)s OR until >= '9000-01-01Z' RETURNING 1
)
SELECT host, CASE WHEN until < '9000-01-01Z' THEN until END FROM tls_broken
WHERE until > %(now)s
ORDER BY until DESC
LIMIT %(limit)s;

-- name: suppress
-- Add or replace suppression entries given as parallel arrays (the newest entry for a
-- target wins). With keep_longer, a row that lasts as long as the new entry stays
-- (Suppression.outlasts: no end lasts longest), but a bounce's that a complaint's lasts
-- as long as, and so does an operator's entry in force at the new entry's time
-- (Suppression.stands_against), judged on the row the conflict locked. An expiry out of
-- range (changed by hand) does not expire, as in suppressions_for.
INSERT INTO suppressions (target, source, reply, created_at, expires_at, message_id)
SELECT DISTINCT ON (target) target, source, reply, created_at, expires_at, message_id
FROM unnest(%(targets)s::text[], %(sources)s::text[], %(replies)s::text[],
            %(created)s::timestamptz[], %(expires)s::timestamptz[], %(message_ids)s::text[])
     WITH ORDINALITY AS t(target, source, reply, created_at, expires_at, message_id, n)
ORDER BY target, n DESC
ON CONFLICT (target) DO UPDATE
SET source = excluded.source, reply = excluded.reply, created_at = excluded.created_at,
    expires_at = excluded.expires_at, message_id = excluded.message_id
WHERE NOT (%(keep_longer)s::boolean
           AND (((suppressions.expires_at IS NULL
                  OR (excluded.expires_at IS NOT NULL
                      AND suppressions.expires_at >= excluded.expires_at))
                 AND NOT (suppressions.source IN ('hard_bounce', 'async_bounce')
                          AND excluded.source NOT IN ('hard_bounce', 'async_bounce')
                          AND (excluded.expires_at IS NULL
                               OR (suppressions.expires_at IS NOT NULL
                                   AND excluded.expires_at >= suppressions.expires_at))))
                OR (suppressions.source = 'manual'
                    AND (suppressions.expires_at > excluded.created_at
                         OR suppressions.expires_at < '1900-01-01Z'))));

-- name: unsuppress
WITH removed AS (
    DELETE FROM suppressions WHERE target = ANY(%(targets)s::text[]) RETURNING 1
)
SELECT count(*) FROM removed;

-- name: suppressions_for
-- As in the lease queries, a time outside 1900..9000 (changed by hand) is NULL: unknown,
-- and an expiry out of range does not expire (stores/side_rows.py).
SELECT target, source, reply,
       CASE WHEN created_at BETWEEN '1900-01-01Z' AND '9000-01-01Z' THEN created_at END,
       CASE WHEN expires_at BETWEEN '1900-01-01Z' AND '9000-01-01Z' THEN expires_at END,
       message_id
FROM suppressions
WHERE target = ANY(%(targets)s::text[])
  AND (expires_at IS NULL OR expires_at > %(now)s OR expires_at < '1900-01-01Z');

-- name: list_suppressions
-- Times out of range as in suppressions_for.
SELECT target, source, reply,
       CASE WHEN created_at BETWEEN '1900-01-01Z' AND '9000-01-01Z' THEN created_at END,
       CASE WHEN expires_at BETWEEN '1900-01-01Z' AND '9000-01-01Z' THEN expires_at END,
       message_id
FROM suppressions
WHERE target > %(after)s
  AND (%(now)s::timestamptz IS NULL OR expires_at IS NULL OR expires_at > %(now)s
       OR expires_at < '1900-01-01Z')
ORDER BY target
LIMIT %(limit)s;

-- name: prune_suppressions
-- Entries expired at or before expired_before, soonest first, found on
-- suppressions_expiry (schema version 19); a row another session is writing is skipped
-- (its entry may be in force again) and left for a later call. An expiry out of range
-- (changed by hand) does not expire, as in suppressions_for.
WITH doomed AS (
    SELECT target FROM suppressions
    WHERE expires_at >= '1900-01-01Z' AND expires_at <= %(expired_before)s
    ORDER BY expires_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), pruned AS (
    DELETE FROM suppressions s USING doomed WHERE s.target = doomed.target RETURNING 1
)
SELECT count(*) FROM pruned;

-- name: fail_late
-- A delivered recipient failed after the fact (a late bounce): the attempt becomes its
-- last reply and joins the history without counting as a delivery attempt. Only a
-- delivered one: no other was accepted by a server. Returns whether the message exists
-- and whether the recipient changed.
WITH msg AS (
    SELECT id FROM messages WHERE id = %(message_id)s
), updated AS (
    UPDATE recipients r
    SET state = 'failed', last_attempt_at = %(at)s, next_attempt_at = NULL,
        finished_at = %(at)s, lease_token = NULL, lease_expires_at = NULL,
        reply_code = %(reply_code)s, reply_enhanced = %(reply_enhanced)s,
        reply_text = %(reply_text)s, error = %(error)s, mx_host = %(mx_host)s, ip = %(ip)s,
        tls = %(tls_version)s::text IS NOT NULL, uncertain = false,
        reason_class = %(reason_class)s
    FROM msg
    WHERE r.message_id = msg.id AND r.address = %(address)s AND r.state = 'delivered'
    RETURNING r.message_id, r.address
), history AS (
    -- The whole attempt, as record keeps a recorded one (the recipient's own uncertain
    -- is cleared above: a late failure is certain).
    INSERT INTO attempts (message_id, address, at, outcome, duration, mx_host, ip, port,
                          tls_version, tls_cipher, reply_code, reply_enhanced, reply_text,
                          error, uncertain, reason_class, tls_policy)
    SELECT u.message_id, u.address, %(at)s, %(outcome)s, %(duration)s, %(mx_host)s, %(ip)s,
           %(port)s, %(tls_version)s, %(tls_cipher)s, %(reply_code)s, %(reply_enhanced)s,
           %(reply_text)s, %(error)s, %(uncertain)s, %(reason_class)s, %(tls_policy)s
    FROM updated u
    RETURNING 1
), trimmed AS (
    -- Sees the history before this statement's insert: keeps one fewer than the bound.
    DELETE FROM attempts a
    USING updated u
    WHERE a.message_id = u.message_id
      AND a.address = u.address
      AND a.id NOT IN (SELECT k.id FROM attempts k
                       WHERE k.message_id = u.message_id AND k.address = u.address
                       ORDER BY k.id DESC LIMIT %(max_history)s - 1)
    RETURNING 1
)
SELECT (SELECT count(*) FROM msg), (SELECT count(*) FROM updated);

-- name: recipients_by_address
-- The recipients of message %(id)s whose address, its ASCII letters folded (as SQLite's
-- lower() folds them), is one of %(addresses)s: all of them when it is NULL, or when the
-- message has one recipient only (r_single: two rows of the key at most). Without
-- history or pauses (t and a stay empty). Each name is sought, not every address of the
-- message folded: an address with no capital letter is its own fold, in the key (l); one
-- with a capital letter is found by its fold in recipients_folded (schema 29), which
-- holds only those (u). The key is sought by a row comparison, which only the key can
-- serve: with l.message_id = m.id AND l.address = w.name, a name unknown at planning
-- (from unnest) could be sought in recipients_address, every message's row of the name
-- read (5,020 for a name 5,000 other messages hold). Name by name, in a lateral join
-- planned apart (OFFSET 0): with = ANY(names) instead, a prepared statement's generic
-- plan (made for a message of average size) read the message's whole range of the key
-- and compared each row.
-- include: _status_columns
     , s.single AS r_single
FROM messages m
CROSS JOIN LATERAL (
    SELECT count(*) = 1 AS single
    -- In the key's order: the planner walks the key, not the table, to the first two.
    FROM (SELECT 1 FROM recipients c WHERE c.message_id = %(id)s
          ORDER BY c.address LIMIT 2) c
) s
LEFT JOIN LATERAL (
    SELECT * FROM recipients e
    WHERE e.message_id = m.id AND (%(addresses)s::text[] IS NULL OR s.single)
    UNION ALL
    SELECT f.* FROM (SELECT DISTINCT unnest(%(addresses)s::text[])) w (name)
    CROSS JOIN LATERAL (
        (SELECT * FROM recipients l
         WHERE (l.message_id, l.address) >= (m.id, w.name)
           AND (l.message_id, l.address) <= (m.id, w.name)
           AND l.address = translate(l.address, 'ABCDEFGHIJKLMNOPQRSTUVWXYZ',
                                     'abcdefghijklmnopqrstuvwxyz')
         UNION ALL
         SELECT * FROM recipients u
         WHERE u.message_id = m.id
           AND u.address <> translate(u.address, 'ABCDEFGHIJKLMNOPQRSTUVWXYZ',
                                      'abcdefghijklmnopqrstuvwxyz')
           AND translate(u.address, 'ABCDEFGHIJKLMNOPQRSTUVWXYZ',
                         'abcdefghijklmnopqrstuvwxyz') = w.name)
        OFFSET 0
    ) f
    WHERE NOT s.single
) r ON true
LEFT JOIN destination_throttles t ON false
LEFT JOIN attempts a ON false
WHERE m.id = %(id)s
ORDER BY r.position;

-- name: message_ids_for_header
SELECT id FROM messages
WHERE header_message_id = %(header_message_id)s
ORDER BY created_at DESC, seq DESC
LIMIT %(limit)s;

-- name: verp_key
-- The key, made from %(key)s if there is none yet. The SELECT below does not see a row
-- this statement inserts (one snapshot), so exactly one of the two returns it; a row
-- another transaction inserted concurrently is seen by neither (the caller asks again).
WITH made AS (
    INSERT INTO verp_key (id, key) VALUES (1, %(key)s)
    ON CONFLICT (id) DO NOTHING
    RETURNING key
)
SELECT key FROM made
UNION ALL
SELECT key FROM verp_key WHERE id = 1;

-- name: server_clock
-- The server's clock at this moment: clock_timestamp(), not now() (the start of the
-- transaction), and schema-qualified, so that a function of the same name earlier in
-- the search_path cannot stand in for it. See stores/clock.py.
SELECT pg_catalog.clock_timestamp();

-- name: _channel
-- The NOTIFY channel of this queue. Channels are the database's, shared by every schema
-- in it, so a queue in a schema of its own (the store URL's search_path) announces on a
-- channel named after that schema's oid: on one name, two installs in two schemas woke
-- each other's workers at every enqueue and stopped them at every cancel. A queue in
-- public keeps the name it always had, which workers of older versions listen on.
(SELECT CASE n.nspname WHEN 'public' THEN 'mailstrom_work'
                       ELSE 'mailstrom_work_' || n.oid::text END
   FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
  WHERE c.oid = 'messages'::pg_catalog.regclass)

-- name: channel
-- The NOTIFY channel of this queue (_channel), for the LISTEN and the enqueues' NOTIFY.
SELECT
-- include: _channel
    AS channel;

-- name: listen_untimed
-- The LISTEN connection waits idle between two NOTIFYs by design: a DBA's
-- idle_session_timeout (for the database, the role, a managed service's default) ended it
-- at every lull. Off for this session only; a server older than version 14, which has no
-- such setting, changes nothing.
SELECT pg_catalog.set_config(s.name, '0', false)
FROM pg_catalog.pg_settings s
WHERE s.name = 'idle_session_timeout';
