-- PostgreSQL at speed (issue #19 §4): an event's insert no longer checks its task through a
-- foreign key. The check ran a statement of its own per event (six per task) that locked the
-- task's row again and wrote a WAL record for that lock, in transactions that already hold the
-- row locked: every insert of an event runs under its task's row lock (`open_task`, or the
-- submit's own insert), and a task is deleted only by `prune`, which deletes its events first
-- in the same transaction. Outbox rows and approvals keep theirs (rare, and cascaded).
ALTER TABLE task_events DROP CONSTRAINT IF EXISTS task_events_task_seq_fkey;
