-- Retention finds old finished tasks without scanning the table.
CREATE INDEX tasks_finished ON tasks (finished_at) WHERE finished_at IS NOT NULL;
