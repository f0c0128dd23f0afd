-- Pruning reads the event log from its oldest cursor (src/store/sqlite/mod.rs,
-- prune_events), so the index on created_at only cost an extra B-tree insert and a page
-- written per event: about 6,000 instructions an event, two events per inbound webhook, all
-- inside the single writer (docs/BENCHMARKS.md).
DROP INDEX events_created;
