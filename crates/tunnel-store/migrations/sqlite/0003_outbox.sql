-- Messages to deliver (Discord, Telegram, webhooks), written in the same transaction as the
-- state change that causes them. One destination's messages go out in id order.
CREATE TABLE outbox (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    task_seq    INTEGER REFERENCES tasks (seq) ON DELETE CASCADE,
    destination TEXT    NOT NULL,
    kind        TEXT    NOT NULL,            -- progress | edit | final | webhook | notify
    target      TEXT    NOT NULL,            -- JSON ReplyTo
    body        TEXT,                        -- JSON, for notify
    state       TEXT    NOT NULL,            -- pending | sent | failed | skipped
    attempts    INTEGER NOT NULL DEFAULT 0,
    next_at     INTEGER NOT NULL,
    done_parts  INTEGER NOT NULL DEFAULT 0,  -- chunks of a split message already sent
    message_id  TEXT,                        -- the platform's id of the first message sent
    last_error  TEXT,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL
);
CREATE INDEX outbox_pending ON outbox (destination, id) WHERE state = 'pending';
CREATE INDEX outbox_due ON outbox (next_at) WHERE state = 'pending';
CREATE INDEX outbox_task ON outbox (task_seq, kind);
