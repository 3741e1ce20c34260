-- mailstrom PostgreSQL schema, version 14: the index `mailstrom bounce` finds a returned
-- Message-ID by holds a hash of each message's Message-ID rather than the text. A B-tree
-- entry holds the value itself, at most 2,704 octets (a third of a page), and a longer
-- Message-ID (a quoted id-left folded over many lines: valid to RFC 5322 and to
-- mailstrom) failed the enqueue of its message; the lookup only ever asks for equality.
DROP INDEX messages_header_id;
CREATE INDEX messages_header_id ON messages USING hash (header_message_id)
    WHERE header_message_id IS NOT NULL;
