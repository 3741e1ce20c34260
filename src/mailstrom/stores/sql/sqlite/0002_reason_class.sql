-- mailstrom SQLite schema, version 2: why a reply failed, in words a user can act on
-- (rate_limited, authentication, reputation, policy, mailbox, content, ...), per attempt
-- and for a recipient's latest attempt. NULL for attempts recorded before version 2 and
-- for deliveries.

ALTER TABLE attempts ADD COLUMN reason_class TEXT;

ALTER TABLE recipients ADD COLUMN reason_class TEXT;
