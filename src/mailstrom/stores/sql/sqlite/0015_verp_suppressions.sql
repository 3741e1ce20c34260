-- mailstrom SQLite schema, version 15: no VERP address on the suppression list.
--
-- Earlier versions suppressed a VERP address (bounces+<token>@..., the return path of one
-- recipient of one message, where its bounce notices go) when a notice to it was refused
-- or a report came about one, with no end. A recipient's delay warning and its failure
-- notice go to the same such address, so the entry failed the later notice unsent, as
-- "suppressed". Mailstrom no longer writes them (bounces.verp.is_verp_address); these are
-- dropped. An operator's own entry stays.
--
-- A token is 32 hex digits, "-", 10 hex digits, with no hex digit next to it; GLOB has
-- no counts, so the pattern's classes are made by repeating one (h32 is 32 of them), and
-- a space on each side lets one pattern find a token at either end too.
DELETE FROM suppressions
WHERE source <> 'manual'
    AND instr(target, '@') > 0
    AND ' ' || lower(target) || ' ' GLOB (
        SELECT '*[^0-9a-f]' || h32 || '-' || substr(h32, 1, 80) || '[^0-9a-f]*'
        FROM (SELECT replace(hex(zeroblob(16)), '0', '[0-9a-f]') AS h32)
    );
