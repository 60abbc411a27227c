-- Ready tasks by agent, so the queue position of a new task is counted in the index alone
-- (mirrors the SQLite migration of the same number).
CREATE INDEX tasks_ready_agent ON tasks (agent, seq) WHERE ready;
