-- mailstrom PostgreSQL schema, version 23: each destination's due recipients in one range.
--
-- A lease read the due work of a lane oldest first whatever its destination, so a slow
-- destination's backlog filled the worker's leases and mail to every other destination
-- queued after it waited for most of that backlog. A fair lease (Store.lease's busy and
-- per_destination) passes over the destinations that have work enough in the worker, and
-- seeks the earliest due recipients of each other destination in this index instead of
-- walking recipients_lane_due past a deep backlog (queries.sql: _fair_due): the same
-- expression and WHERE clause as recipients_lane_due, behind the lane and the domain. A
-- write lock on recipients while it is built.
CREATE INDEX recipients_destination_due
    ON recipients (lane, domain, (GREATEST(next_attempt_at, lease_expires_at)), seq, position)
    WHERE state IN ('queued', 'deferred') AND NOT aside;
