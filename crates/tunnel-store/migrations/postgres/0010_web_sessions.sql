-- Dashboard sign-ins (issue #17): session cookies and one-time sign-in codes. Only the SHA-256
-- of the secret is kept, as for tokens; a row is valid while expires_at is in the future.
CREATE TABLE web_sessions (
    id_sha256  BYTEA  PRIMARY KEY,
    kind       TEXT   NOT NULL,   -- session | code
    token_id   TEXT   NOT NULL,   -- the tunnel token it was exchanged for
    role       TEXT   NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE INDEX web_sessions_expiry ON web_sessions (expires_at);
-- The dashboard's task list filters by runner.
CREATE INDEX tasks_runner ON tasks (runner, seq) WHERE runner IS NOT NULL;
-- The overview counts from indexes alone (no table lookups), even with 100,000 tasks:
-- finished per minute (with state and owner), and waiting per agent.
CREATE INDEX tasks_finished_by_state ON tasks (finished_at, state, owner) WHERE finished_at IS NOT NULL;
CREATE INDEX tasks_waiting ON tasks (state, agent, created_at, owner) WHERE state IN ('queued', 'parked');
