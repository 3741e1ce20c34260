-- mailstrom PostgreSQL schema, version 25: the failed recipients of one domain in one
-- range.
--
-- With recipients_pending_domain (schema 1) and recipients_delivered_domain (schema 24)
-- every recipient of a domain is in one of three ranges, so the lists of a domain's mail
-- in any state (`mailstrom queue --domain d`, the store's query, select_ids and count)
-- read those ranges: a message listed for its domain may have its recipient there in any
-- state (delivered or failed there, pending elsewhere), and no index had a failed one's
-- domain, so each of those lists probed every message of the queue newest first (20,000
-- probes for five messages). A recipient writes one entry more when it fails (a row
-- rarely written again after that).
CREATE INDEX recipients_failed_domain ON recipients (domain, message_id)
    WHERE state = 'failed';
