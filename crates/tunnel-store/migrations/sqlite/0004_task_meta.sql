-- The client's own data about a task (SubmitTask.meta), a JSON object.
ALTER TABLE tasks ADD COLUMN meta TEXT;
