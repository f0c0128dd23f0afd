-- The messages' full-text index merges its segments in small steps, one per group commit
-- (src/store/sqlite/search_index.rs), instead of FTS5's automatic merging: that ran inside
-- whichever commit crossed its threshold and, on the benchmark's million messages, held the
-- single writer for 10-25 ms about twice a second while every write waited.
INSERT INTO messages_fts (messages_fts, rank) VALUES ('automerge', 0);
