-- mailstrom SQLite schema, version 23: MTA-STS policies by their expiry.
--
-- A cached policy was kept for ever, one per recipient domain that ever published one;
-- workers now delete those expired for long (Store.prune_mta_sts_policies), a bounded
-- batch a write, soonest expired first. Without this index each batch read every policy.
-- IF NOT EXISTS: a store set back a version by hand runs the latest again.
CREATE INDEX IF NOT EXISTS mta_sts_policies_expiry ON mta_sts_policies (expires_at);
