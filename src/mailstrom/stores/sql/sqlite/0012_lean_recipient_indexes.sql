-- mailstrom SQLite schema, version 12: two recipient indexes fewer for every enqueue,
-- lease and record to keep up to date.
--
-- recipients_due (every lane's due work in one order) duplicated recipients_lane_due
-- (the same per lane) since priority lanes came: the worker leases lane by lane, and what
-- still wanted every lane at once (leasing without lanes, the lanes no longer
-- configured, the next due time) now walks recipients_lane_due one lane after another.
-- recipients_lease found a lease's rows by token for extend and release, which now find
-- them by the row ids the lease handed out. The lease UPDATE changed both (four index
-- writes per recipient leased), the result UPDATE removed both, an enqueue added one.
DROP INDEX IF EXISTS recipients_due;
DROP INDEX IF EXISTS recipients_lease;
