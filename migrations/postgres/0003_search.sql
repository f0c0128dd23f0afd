-- Full-text search (GET /api/v1/search, docs/search.md) and language detection.

-- The language of inbound messages (ISO 639-1, confidence 0..1; NULL when the text is too
-- short or the detection unreliable) and the conversation's running language: that of its
-- latest inbound message with a reliable detection.
ALTER TABLE messages ADD COLUMN language TEXT, ADD COLUMN language_confidence DOUBLE PRECISION;
ALTER TABLE conversations ADD COLUMN language TEXT, ADD COLUMN language_confidence DOUBLE PRECISION;

-- The text search configuration: `simple` (lower case, no stemming and no stop words, so it
-- treats every language alike, as SQLite's unicode61 tokenizer does) with `unaccent` in
-- front, so that "manana" finds "mañana" as on SQLite. unaccent ships with PostgreSQL's
-- contrib package and is a trusted extension (a database owner may create it); where it
-- cannot be created the configuration is plain `simple` and accents must match exactly.
DO $$
BEGIN
    BEGIN
        CREATE EXTENSION IF NOT EXISTS unaccent;
    EXCEPTION WHEN OTHERS THEN
        RAISE NOTICE 'unaccent is not available (%); search will match accents exactly', SQLERRM;
    END;
    CREATE TEXT SEARCH CONFIGURATION switchboard_search (COPY = simple);
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'unaccent') THEN
        ALTER TEXT SEARCH CONFIGURATION switchboard_search
            ALTER MAPPING FOR asciiword, word, numword, asciihword, hword, numhword, hword_asciipart,
                hword_part, hword_numpart
            WITH unaccent, simple;
    END IF;
END
$$;

-- The indexed text has ASCII punctuation turned into spaces first (a codepoint range, so
-- the result does not depend on the locale): PostgreSQL's parser would otherwise drop
-- anything that looks like an HTML tag and keep hosts, e-mail addresses, paths and decimal
-- numbers as single words, where SQLite's tokenizer splits them. Both backends then find the
-- same words. Generated columns are computed in the writing statement, so the index is
-- always in step with the row.
ALTER TABLE messages ADD COLUMN search_tsv tsvector GENERATED ALWAYS AS (
    to_tsvector('switchboard_search', regexp_replace(body, '[!-/:-@\[-`{-~]+', ' ', 'g'))
) STORED;
CREATE INDEX messages_search ON messages USING GIN (search_tsv);

ALTER TABLE contacts ADD COLUMN search_tsv tsvector GENERATED ALWAYS AS (
    to_tsvector('switchboard_search', regexp_replace(display_name || ' ' || phone_number, '[!-/:-@\[-`{-~]+', ' ', 'g'))
) STORED;
CREATE INDEX contacts_search ON contacts USING GIN (search_tsv);
