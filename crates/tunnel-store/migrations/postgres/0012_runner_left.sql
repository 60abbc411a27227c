-- When a runner said goodbye (a clean stop): offline at once instead of after the online
-- window. Cleared by its next claim.
ALTER TABLE runners ADD COLUMN left_at BIGINT;
