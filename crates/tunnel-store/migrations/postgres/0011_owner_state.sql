-- A client's task list by state (the dashboard overview's running and failed lists) without
-- walking all of the owner's tasks (SQLite's 0011 adds the same index).
CREATE INDEX tasks_owner_state ON tasks (owner, state, seq);
