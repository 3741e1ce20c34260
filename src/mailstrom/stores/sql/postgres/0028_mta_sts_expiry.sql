-- mailstrom PostgreSQL schema, version 28: MTA-STS policies by their expiry.
--
-- A cached policy was kept for ever, one per recipient domain that ever published one;
-- workers now delete those expired for long (queries.sql: prune_mta_sts_policies), a
-- bounded batch a statement, soonest expired first. Without this index each batch read
-- every policy. Built in the migration's transaction: its SHARE lock holds only saves of
-- policies (this small table), for as long as reading it takes.
-- IF NOT EXISTS: a store set back a version by hand runs the latest again.
CREATE INDEX IF NOT EXISTS mta_sts_policies_expiry ON mta_sts_policies (expires_at);
