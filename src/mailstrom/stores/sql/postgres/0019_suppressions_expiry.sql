-- mailstrom PostgreSQL schema, version 19: the suppression entries by expiry.
--
-- An entry that expired applies to nobody, and was kept for ever: a list fed by the
-- hard bounces of suppress_for grew without end. The worker deletes the entries that
-- expired long ago (Store.prune_suppressions), a bounded batch a statement, found here
-- rather than by reading the whole list. Only entries with an expiry are indexed.
CREATE INDEX suppressions_expiry ON suppressions (expires_at)
    WHERE expires_at IS NOT NULL;
