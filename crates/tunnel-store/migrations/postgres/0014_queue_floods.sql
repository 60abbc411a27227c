-- Mirrors the SQLite migration of the same number: ready tasks by (agent, project, seq) for
-- the claim, queued tasks by age for the maximum time in queue, waiting tasks per token for
-- the per-token cap.
CREATE INDEX tasks_ready_claim ON tasks (agent, COALESCE(project, ''), seq) WHERE ready;
CREATE INDEX tasks_queued_age ON tasks (created_at) WHERE state = 'queued';
CREATE INDEX tasks_owner_waiting ON tasks (owner) WHERE state IN ('queued', 'parked');
-- Each runner name belongs to the runner token that first claimed under it (NULL: not yet
-- claimed by a token, or from before this column): another token claiming the name is refused,
-- so tasks pinned to a runner's sessions reach only that runner.
ALTER TABLE runners ADD COLUMN token TEXT;
