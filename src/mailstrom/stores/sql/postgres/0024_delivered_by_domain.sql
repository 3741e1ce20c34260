-- mailstrom PostgreSQL schema, version 24: the delivered recipients of one domain in one
-- range.
--
-- Listing the delivered mail of one domain (`mailstrom queue --state delivered --domain
-- d`, the store's query, select_ids and count; the dashboard's Delivered view with a
-- domain) read every message of the queue, or every recipient: no index had the domain
-- of a delivered recipient (recipients_state_seq leaves delivered rows out, the pending
-- ones have their own). At 200,000 delivered recipients the store's list of three took
-- 1.1 s, 200,003 probes; each reads the range of its domain here now, and the planner
-- still walks the queue newest first when the domain holds much of it. A recipient
-- writes one entry more, when it is delivered (a row rarely written again after that).
CREATE INDEX recipients_delivered_domain ON recipients (domain, message_id)
    WHERE state = 'delivered';
