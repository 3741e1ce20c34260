-- mailstrom SQLite schema, version 19: each destination's due recipients in one range.
--
-- A lease read the due work of a lane oldest first whatever its destination, so a slow
-- destination's backlog filled the worker's leases and mail to every other destination
-- queued after it waited for most of that backlog. A fair lease (Store.lease's busy and
-- per_destination) passes over the destinations that have work enough in the worker;
-- walking recipients_lane_due past a deep backlog of one cost 12 to 41 ms a lease at
-- 20,000 to 200,000 recipients. With this index the lease seeks each other destination's
-- earliest due recipients instead (sqlite_queue.DESTINATIONS_SQL): the same expression and
-- WHERE clause as recipients_lane_due, behind the lane and the domain.
CREATE INDEX recipients_destination_due
    ON recipients (lane, domain, max(next_attempt_at, coalesce(lease_expires_at, 0)), id)
    WHERE state IN ('queued', 'deferred') AND held = 0;
