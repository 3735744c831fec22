-- The history with one index instead of two. It had a primary key on (facility_id, seq),
-- which absorbed replays, and an index on (facility_id, since) for the console's reads by
-- time: every transition the sink wrote went into two B-trees, about half of the server's
-- work per row (README, "Following transitions", PostgreSQL). One key on
-- (facility_id, since, seq) does both jobs: a transition is an immutable Kafka record, so a
-- replay (a sink restarted before its commit, two sinks overlapping in a rebalance) carries
-- the same since as the first copy and is absorbed as before, and the reads by time use the
-- key's first two columns as they used the index.
--
-- Building the key reads the whole table under an ACCESS EXCLUSIVE lock: on a large history
-- this migration takes a while, with the console's reads waiting. A sink older than this
-- migration names the old key in its ON CONFLICT and fails on the migrated table: stop the
-- old sinks before starting a new one (the sink names the conflict target nowhere now).
ALTER TABLE facility_transitions DROP CONSTRAINT facility_transitions_pkey;
DROP INDEX facility_transitions_since;
ALTER TABLE facility_transitions ADD CONSTRAINT facility_transitions_pkey PRIMARY KEY (facility_id, since, seq);
