-- Who a conversation's binding and a task's session belong to: the client token whose task or
-- call made it (NULL: made by an admin, or found on a runner's disk; shared).
ALTER TABLE sessions ADD COLUMN owner TEXT;
ALTER TABLE session_history ADD COLUMN owner TEXT;
