-- Search's ranking window (docs/search.md) reads the ID, creation time and body of the newest
-- 501 messages that match a query. Through the unique index on search_rowid, each of those
-- cost a look-up in the messages table, whose pages hold whole rows: the window's rows were
-- spread over about a thousand pages that did not stay in a reader's 2 MB page cache, and a
-- search read about 170 pages from the file. This index covers the window (and the look-up
-- by search_rowid of the hits returned), so the window is read from the index's newest end
-- alone: about 3 page reads per search on the benchmark's million messages. It replaces the
-- unique index: the insert trigger (0008) is the only writer of search_rowid and gives every
-- row a key above every key in use, under SQLite's single writer. Costs the bodies once more
-- on disk (about 19 % more on the benchmark's database).
DROP INDEX messages_search_rowid;
CREATE INDEX messages_search_window ON messages (search_rowid, id, created_at, body);
