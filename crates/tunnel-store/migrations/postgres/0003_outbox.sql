-- Messages to deliver (Discord, Telegram, webhooks), written in the same transaction as the
-- state change that causes them. One destination's messages go out in id order.
CREATE TABLE outbox (
    id            BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    task_seq      BIGINT REFERENCES tasks (seq) ON DELETE CASCADE,
    destination   TEXT   NOT NULL,
    kind          TEXT   NOT NULL,            -- progress | edit | final | webhook | notify
    target        TEXT   NOT NULL,            -- JSON ReplyTo
    body          TEXT,                       -- JSON, for notify
    state         TEXT   NOT NULL,            -- pending | sent | failed | skipped
    attempts      BIGINT NOT NULL DEFAULT 0,
    next_at       BIGINT NOT NULL,
    done_parts    BIGINT NOT NULL DEFAULT 0,  -- chunks of a split message already sent
    message_id    TEXT,                       -- the platform's id of the first message sent
    last_error    TEXT,
    -- PostgreSQL only: the instance sending this row holds it until then, so several
    -- servers never send the same row at once. Cleared when the outcome is recorded.
    claimed_until BIGINT,
    created_at    BIGINT NOT NULL,
    updated_at    BIGINT NOT NULL
);
CREATE INDEX outbox_pending ON outbox (destination, id) WHERE state = 'pending';
CREATE INDEX outbox_due ON outbox (next_at) WHERE state = 'pending';
CREATE INDEX outbox_task ON outbox (task_seq, kind);
