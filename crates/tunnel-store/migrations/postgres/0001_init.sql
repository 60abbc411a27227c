-- Tasks, in submission order (seq). Times are Unix milliseconds from the server's clock.
-- The same schema as migrations/sqlite, in PostgreSQL types.
CREATE TABLE tasks (
    seq              BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id               TEXT    NOT NULL UNIQUE,
    agent            TEXT    NOT NULL,
    prompt           TEXT    NOT NULL,
    conversation     TEXT,
    -- agent + US + conversation: tasks sharing it run one at a time, in seq order.
    session_key      TEXT,
    project          TEXT,
    model            TEXT,
    timeout_ms       BIGINT,
    session_mode     TEXT    NOT NULL,            -- continue | new | resume
    resume_id        TEXT,
    max_attempts     BIGINT  NOT NULL,
    reply_to         TEXT,                        -- JSON
    owner            TEXT    NOT NULL,            -- token id that submitted it
    idempotency_key  TEXT,
    state            TEXT    NOT NULL,
    -- true when queued/parked and first of its session: the only rows a claim looks at.
    ready            BOOLEAN NOT NULL,
    attempt          BIGINT  NOT NULL DEFAULT 0,  -- offers made (fencing number)
    runs             BIGINT  NOT NULL DEFAULT 0,  -- offers acked (counted against max_attempts)
    lease_token      TEXT,
    runner           TEXT,
    ack_by           BIGINT,
    lease_until      BIGINT,
    not_before       BIGINT,
    cancel_requested BOOLEAN NOT NULL DEFAULT FALSE,
    reason           TEXT,
    result           TEXT,                        -- JSON
    next_event_seq   BIGINT  NOT NULL DEFAULT 1,
    created_at       BIGINT  NOT NULL,
    updated_at       BIGINT  NOT NULL,
    started_at       BIGINT,
    finished_at      BIGINT                       -- set exactly when the state is terminal
);
CREATE UNIQUE INDEX tasks_idempotency ON tasks (owner, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX tasks_ready ON tasks (seq) WHERE ready;
CREATE INDEX tasks_session_open ON tasks (session_key, seq) WHERE session_key IS NOT NULL AND finished_at IS NULL;
CREATE INDEX tasks_offer_deadline ON tasks (ack_by) WHERE state = 'offered';
CREATE INDEX tasks_lease_deadline ON tasks (lease_until) WHERE state IN ('running', 'cancelling');
CREATE INDEX tasks_parked_deadline ON tasks (not_before) WHERE state = 'parked';
CREATE INDEX tasks_runner_open ON tasks (runner) WHERE finished_at IS NULL;
CREATE INDEX tasks_state ON tasks (state, seq);
CREATE INDEX tasks_conversation ON tasks (conversation, seq);
CREATE INDEX tasks_owner ON tasks (owner, seq);

-- The append-only event log of each task.
CREATE TABLE task_events (
    task_seq BIGINT  NOT NULL REFERENCES tasks (seq) ON DELETE CASCADE,
    seq      BIGINT  NOT NULL,
    attempt  BIGINT  NOT NULL,
    n        BIGINT,             -- the runner's number within the attempt (dedup of retries)
    kind     TEXT    NOT NULL,
    data     TEXT    NOT NULL,   -- JSON
    at       BIGINT  NOT NULL,
    PRIMARY KEY (task_seq, seq)
);
CREATE UNIQUE INDEX task_events_dedup ON task_events (task_seq, attempt, n) WHERE n IS NOT NULL;
CREATE INDEX task_events_at ON task_events (at);

CREATE TABLE runners (
    name       TEXT PRIMARY KEY,
    agents     TEXT    NOT NULL,  -- JSON array
    projects   TEXT    NOT NULL,  -- JSON array
    capacity   BIGINT  NOT NULL,
    version    TEXT,
    first_seen BIGINT  NOT NULL,
    last_seen  BIGINT  NOT NULL
);

-- The session each conversation is bound to, per agent.
CREATE TABLE sessions (
    agent        TEXT NOT NULL,
    conversation TEXT NOT NULL,
    session_id   TEXT,
    runner       TEXT,
    updated_at   BIGINT NOT NULL,
    PRIMARY KEY (agent, conversation)
);

-- Every native session seen, for `recent` and to find the runner of a resumed id.
CREATE TABLE session_history (
    agent        TEXT NOT NULL,
    session_id   TEXT NOT NULL,
    runner       TEXT,
    conversation TEXT,
    last_used    BIGINT NOT NULL,
    PRIMARY KEY (agent, session_id)
);
CREATE INDEX session_history_recent ON session_history (last_used);

CREATE TABLE tokens (
    id            TEXT PRIMARY KEY,
    name          TEXT   NOT NULL,
    role          TEXT   NOT NULL,
    secret_sha256 BYTEA  NOT NULL,
    created_at    BIGINT NOT NULL,
    revoked_at    BIGINT
);
