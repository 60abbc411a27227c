-- Ready tasks by what a runner offers: agent, then project ('' for none; names are never
-- empty). A claim walks one range of it per (agent, project) the runner has, so its cost does
-- not grow with tasks queued for agents or projects it lacks.
CREATE INDEX tasks_ready_claim ON tasks (agent, coalesce(project, ''), seq) WHERE ready = 1;
-- Queued tasks by age: the deadline timer ends those past the maximum time in queue.
CREATE INDEX tasks_queued_age ON tasks (created_at) WHERE state = 'queued';
-- Waiting tasks per submitting token: the per-token cap on queued tasks counts in the index.
CREATE INDEX tasks_owner_waiting ON tasks (owner) WHERE state IN ('queued', 'parked');
-- Each runner name belongs to the runner token that first claimed under it (NULL: not yet
-- claimed by a token, or from before this column): another token claiming the name is refused,
-- so tasks pinned to a runner's sessions reach only that runner.
ALTER TABLE runners ADD COLUMN token TEXT;
