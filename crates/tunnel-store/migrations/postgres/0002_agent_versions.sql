-- The version each agent CLI reported, as a JSON object.
ALTER TABLE runners ADD COLUMN agent_versions TEXT NOT NULL DEFAULT '{}';
