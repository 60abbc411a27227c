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
UPDATE tasks SET session_key = session_key || chr(31) || conv_owner
    WHERE session_key IS NOT NULL AND conv_owner <> '';
UPDATE sessions SET owner = '' WHERE owner IS NULL;
ALTER TABLE sessions ALTER COLUMN owner SET DEFAULT '';
ALTER TABLE sessions ALTER COLUMN owner SET NOT NULL;
ALTER TABLE sessions DROP CONSTRAINT sessions_pkey;
ALTER TABLE sessions ADD PRIMARY KEY (owner, agent, conversation);
