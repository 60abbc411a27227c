-- Mirrors the SQLite migration of the same number: ready tasks by (agent, project, seq) for
-- the claim, queued tasks by age for the maximum time in queue, waiting tasks per token for
-- the per-token cap.
CREATE INDEX tasks_ready_claim ON tasks (agent, COALESCE(project, ''), seq) WHERE ready;
CREATE INDEX tasks_queued_age ON tasks (created_at) WHERE state = 'queued';
CREATE INDEX tasks_owner_waiting ON tasks (owner) WHERE state IN ('queued', 'parked');
