-- Approvals: an agent asks before it acts, a person answers. One row per question; the runner's
-- key makes a retried ask return the same row within an attempt.
CREATE TABLE approvals (
    id         TEXT    NOT NULL PRIMARY KEY,           -- apr_<uuidv7>: sorts by creation
    task_seq   INTEGER NOT NULL REFERENCES tasks (seq) ON DELETE CASCADE,
    attempt    INTEGER NOT NULL,
    key        TEXT    NOT NULL,
    agent      TEXT    NOT NULL,
    runner     TEXT,
    owner      TEXT    NOT NULL,                       -- the task's owner token (scope)
    state      TEXT    NOT NULL,                       -- pending | allowed | denied | expired | cancelled
    tool       TEXT    NOT NULL,                       -- JSON ApprovalTool
    options    TEXT    NOT NULL,                       -- JSON [ApprovalOption]
    asked_at   INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    outcome    TEXT,                                   -- JSON ApprovalOutcome, once settled
    UNIQUE (task_seq, attempt, key)
);
CREATE INDEX approvals_pending ON approvals (expires_at) WHERE state = 'pending';
CREATE INDEX approvals_task ON approvals (task_seq, state);
CREATE INDEX approvals_owner ON approvals (owner, id);
-- A task's approval policy (auto | ask | deny); NULL: the runner's configuration decides.
ALTER TABLE tasks ADD COLUMN approvals TEXT;
