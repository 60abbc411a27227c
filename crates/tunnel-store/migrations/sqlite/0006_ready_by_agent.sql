-- Ready tasks by agent, so the queue position of a new task is counted in the index alone
-- (with only `tasks_ready`, each counted task was looked up in the table for its agent: the
-- most expensive step of a submit with a deep queue).
CREATE INDEX tasks_ready_agent ON tasks (agent, seq) WHERE ready = 1;
