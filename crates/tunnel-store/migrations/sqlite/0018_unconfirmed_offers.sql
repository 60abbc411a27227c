-- An attempt a claim offered with `ack` (ClaimRequest::ack) is running before its runner has
-- read the answer. Until the runner shows it has it (any call about the attempt, or a later
-- claim listing it in `holding`), `unconfirmed` stays 1, and the same runner's next claim with
-- `ack` gets that offer again, resuming `offer_resume`: also from a server that restarted in
-- between (issue #19). Each offer sets both for its own attempt.
ALTER TABLE tasks ADD COLUMN unconfirmed INTEGER NOT NULL DEFAULT 0;
ALTER TABLE tasks ADD COLUMN offer_resume TEXT;
CREATE INDEX tasks_unconfirmed ON tasks (runner) WHERE unconfirmed = 1;
