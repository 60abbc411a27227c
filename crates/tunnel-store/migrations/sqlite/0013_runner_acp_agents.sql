-- The agents a runner can drive over ACP (`tunnel acp`, `GET /v1/runners`), as a JSON list.
ALTER TABLE runners ADD COLUMN acp_agents TEXT NOT NULL DEFAULT '[]';
