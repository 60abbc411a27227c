-- Conversations are scoped by owner (issue #14): a client token's conversation names are its
-- own, so two clients can each have `discord:123` and nothing one does with a name reaches
-- the other. `owner` is the client token whose namespace a binding is in; '' is the shared
-- namespace of admin tokens. A task's `conv_owner` is the namespace its conversation is in,
-- and a client's `session_key` gets its token id, so each namespace keeps its own order.
-- Existing bindings keep the namespace of their owner (none: shared); a client's tasks move
-- to its own namespace.
ALTER TABLE tasks ADD COLUMN conv_owner TEXT NOT NULL DEFAULT '';
UPDATE tasks SET conv_owner = owner
    WHERE owner IN (SELECT id FROM tokens WHERE role = 'client');
UPDATE tasks SET session_key = session_key || char(31) || conv_owner
    WHERE session_key IS NOT NULL AND conv_owner <> '';
CREATE TABLE sessions_owned (
    owner        TEXT NOT NULL,
    agent        TEXT NOT NULL,
    conversation TEXT NOT NULL,
    session_id   TEXT,
    runner       TEXT,
    updated_at   INTEGER NOT NULL,
    PRIMARY KEY (owner, agent, conversation)
) WITHOUT ROWID;
INSERT INTO sessions_owned (owner, agent, conversation, session_id, runner, updated_at)
    SELECT coalesce(owner, ''), agent, conversation, session_id, runner, updated_at FROM sessions;
DROP TABLE sessions;
ALTER TABLE sessions_owned RENAME TO sessions;
