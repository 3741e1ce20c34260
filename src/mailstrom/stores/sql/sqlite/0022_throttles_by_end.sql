-- mailstrom SQLite schema, version 22: destination pauses by their end.
--
-- A pause is kept a day after it ends (it makes the next one longer), and a throttle
-- deletes those past that as it records one: the DELETE read every pause, so a sender
-- to many small domains answering 421 paid for N pauses O(N^2) (0.55 ms a throttle at
-- 20,000, under the write lock), and every worker's refresh each second read the ended
-- pauses along with the running ones. Both now seek a range of this index.
-- IF NOT EXISTS: a store set back a version by hand runs the latest again.
CREATE INDEX IF NOT EXISTS destination_throttles_until ON destination_throttles (until);
