-- Mirrors the SQLite migration of the same number (issue #19 §3). A state change is not a
-- HOT update here, so every index of the table gets a new entry: fewer indexes, less work per
-- transition. Lists and counts by state read the open states' partial indexes and one over
-- finished tasks (TaskFilter::where_clause names each one's condition).
DROP INDEX tasks_state;
DROP INDEX tasks_owner_state;
CREATE INDEX tasks_done ON tasks (state, seq) WHERE finished_at IS NOT NULL;
CREATE INDEX tasks_owner_done ON tasks (owner, state, seq) WHERE finished_at IS NOT NULL;
DROP INDEX tasks_offer_deadline;
CREATE INDEX tasks_offer_deadline ON tasks (state, ack_by) WHERE state = 'offered';
DROP INDEX tasks_lease_deadline;
CREATE INDEX tasks_lease_deadline ON tasks (state, lease_until) WHERE state IN ('running', 'cancelling');
DROP INDEX tasks_waiting;
CREATE INDEX tasks_waiting ON tasks (state, seq, agent, created_at, owner) WHERE state IN ('queued', 'parked');
-- A prefix of tasks_finished_by_state, which retention reads as well.
DROP INDEX tasks_finished;
DROP INDEX tasks_conversation;
CREATE INDEX tasks_conversation ON tasks (conversation, seq) WHERE conversation IS NOT NULL;
DROP INDEX tasks_runner_open;
CREATE INDEX tasks_runner_open ON tasks (runner) WHERE runner IS NOT NULL AND finished_at IS NULL;
