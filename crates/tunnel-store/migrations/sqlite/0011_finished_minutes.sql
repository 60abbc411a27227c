-- The dashboard's tasks-per-minute chart (issue #17) reads a per-minute rollup instead of
-- counting every task finished in the last hour (90,000 of them took 144 ms a page). Kept by
-- triggers, so every path that finishes a task counts it; pruned with the tasks.
-- SQLite only: on PostgreSQL, several servers finishing tasks would all update the same
-- minute's row and queue behind its lock; there the chart counts from an index.
CREATE TABLE finished_minutes (
    minute    INTEGER NOT NULL,   -- ms since the epoch, a multiple of 60,000
    owner     TEXT    NOT NULL,
    succeeded INTEGER NOT NULL,
    other     INTEGER NOT NULL,   -- failed, cancelled, timed out, lost
    PRIMARY KEY (minute, owner)
) WITHOUT ROWID;
INSERT INTO finished_minutes (minute, owner, succeeded, other)
    SELECT finished_at / 60000 * 60000, owner,
           SUM(state = 'succeeded'), SUM(state <> 'succeeded')
    FROM tasks WHERE finished_at IS NOT NULL GROUP BY 1, 2;
CREATE TRIGGER tasks_finished_insert AFTER INSERT ON tasks WHEN NEW.finished_at IS NOT NULL
BEGIN
    INSERT INTO finished_minutes (minute, owner, succeeded, other)
        VALUES (NEW.finished_at / 60000 * 60000, NEW.owner, NEW.state = 'succeeded', NEW.state <> 'succeeded')
        ON CONFLICT (minute, owner) DO UPDATE
        SET succeeded = succeeded + excluded.succeeded, other = other + excluded.other;
END;
CREATE TRIGGER tasks_finished_update AFTER UPDATE OF finished_at ON tasks
    WHEN NEW.finished_at IS NOT NULL AND OLD.finished_at IS NULL
BEGIN
    INSERT INTO finished_minutes (minute, owner, succeeded, other)
        VALUES (NEW.finished_at / 60000 * 60000, NEW.owner, NEW.state = 'succeeded', NEW.state <> 'succeeded')
        ON CONFLICT (minute, owner) DO UPDATE
        SET succeeded = succeeded + excluded.succeeded, other = other + excluded.other;
END;
-- A client's task list by state (the overview's running and failed lists): with only
-- (owner, seq) the planner walked all of the owner's tasks when none was in that state.
CREATE INDEX tasks_owner_state ON tasks (owner, state, seq);
