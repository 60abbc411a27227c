-- The per-task cap of the event log (issue #14): bytes stored (kind plus JSON data) and
-- runner events dropped past the cap. Open tasks get their current total; finished ones
-- take no more runner events.
ALTER TABLE tasks ADD COLUMN event_bytes BIGINT NOT NULL DEFAULT 0;
ALTER TABLE tasks ADD COLUMN events_dropped BIGINT NOT NULL DEFAULT 0;
UPDATE tasks SET event_bytes = (
    SELECT coalesce(sum(octet_length(kind) + octet_length(data)), 0)
    FROM task_events WHERE task_seq = tasks.seq)
WHERE finished_at IS NULL;
