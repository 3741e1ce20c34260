-- mailstrom PostgreSQL schema, version 17: no VERP address on the suppression list.
--
-- Earlier versions suppressed a VERP address (bounces+<token>@..., the return path of one
-- recipient of one message, where its bounce notices go) when a notice to it was refused
-- or a report came about one, with no end. A recipient's delay warning and its failure
-- notice go to the same such address, so the entry failed the later notice unsent, as
-- "suppressed". Mailstrom no longer writes them (bounces.verp.is_verp_address); these are
-- dropped. An operator's own entry stays. A token is 32 hex digits, "-", 10 hex digits,
-- with no hex digit next to it.
DELETE FROM suppressions
WHERE source <> 'manual'
    AND strpos(target, '@') > 0
    AND lower(target) ~ '(^|[^0-9a-f])[0-9a-f]{32}-[0-9a-f]{10}([^0-9a-f]|$)';
