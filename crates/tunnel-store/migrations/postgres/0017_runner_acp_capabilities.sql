-- What each of a runner's ACP agents answered to `initialize` (`tunnel acp`, `GET /v1/runners`),
-- as a JSON object keyed by agent; NULL until the runner reports it.
ALTER TABLE runners ADD COLUMN acp_capabilities TEXT;
