-- Fewer index entries moved per task (issue #19 §3): a state change of a task used to move
-- entries in six to ten of its twenty indexes, the biggest share of the writer's work per
-- task. Lists and counts by state now read small partial indexes: the open states' own
-- (waiting, offered, running) and one over finished tasks, written once when a task ends,
-- instead of `(state, seq)` and `(owner, state, seq)`, which moved at every transition.
-- Each list query names the partial index's condition (TaskFilter::where_clause).
DROP INDEX tasks_state;
DROP INDEX tasks_owner_state;
CREATE INDEX tasks_done ON tasks (state) WHERE finished_at IS NOT NULL;
CREATE INDEX tasks_owner_done ON tasks (owner, state) WHERE finished_at IS NOT NULL;
-- Offered and running tasks by state first, so a list of them reads these.
DROP INDEX tasks_offer_deadline;
CREATE INDEX tasks_offer_deadline ON tasks (state, ack_by) WHERE state = 'offered';
DROP INDEX tasks_lease_deadline;
CREATE INDEX tasks_lease_deadline ON tasks (state, lease_until) WHERE state IN ('running', 'cancelling');
-- Waiting tasks in seq order within their state (a list of queued tasks reads it in order),
-- still covering the overview's count per agent.
DROP INDEX tasks_waiting;
CREATE INDEX tasks_waiting ON tasks (state, seq, agent, created_at, owner) WHERE state IN ('queued', 'parked');
-- Read by no query: claims read tasks_ready_claim, queue positions tasks_ready_agent.
DROP INDEX tasks_ready;
-- The chart reads finished_minutes here; retention reads tasks_finished.
DROP INDEX tasks_finished_by_state;
-- Only tasks with a conversation (or a runner) are ever looked up by it. The rowid (seq)
-- ends every index entry, so these still give a conversation's tasks in seq order.
DROP INDEX tasks_conversation;
CREATE INDEX tasks_conversation ON tasks (conversation) WHERE conversation IS NOT NULL;
DROP INDEX tasks_runner_open;
CREATE INDEX tasks_runner_open ON tasks (runner) WHERE runner IS NOT NULL AND finished_at IS NULL;
