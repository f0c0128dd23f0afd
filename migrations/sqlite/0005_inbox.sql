-- The web inbox: agents who sign in, their sessions, and the sign-in throttle.
-- email is stored trimmed and lower-cased, so uniqueness is case-insensitive.
CREATE TABLE agents (
    id TEXT PRIMARY KEY,
    email TEXT NOT NULL UNIQUE,
    display_name TEXT NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('admin', 'agent')),
    password_hash TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);

-- A signed-in browser. Only the SHA-256 of the cookie's token is kept; csrf_token is the
-- per-session token the pages send back in forms and the X-CSRF-Token header.
CREATE TABLE agent_sessions (
    token_hash TEXT PRIMARY KEY,
    agent_id TEXT NOT NULL REFERENCES agents (id) ON DELETE CASCADE,
    csrf_token TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    last_seen_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
);
CREATE INDEX agent_sessions_agent ON agent_sessions (agent_id);

-- Failed sign-ins per throttle key (email + client address, and client address alone),
-- counted in a window that starts at the first failure.
CREATE TABLE sign_in_failures (
    key TEXT PRIMARY KEY,
    failures INTEGER NOT NULL,
    window_start INTEGER NOT NULL
);
