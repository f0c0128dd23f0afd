-- Pruning reads the event log from its oldest cursor (src/store/postgres/mod.rs,
-- prune_events, as on SQLite), so the index on created_at is no longer read; it only cost an
-- extra index insert per event.
DROP INDEX events_created;
