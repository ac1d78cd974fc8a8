-- depends: 0002.conversations
-- Turns Postgres refused for their content (the writer sent each to chat.turns.v1.dlq with its reason).
-- The spool settles a turn found here rather than republishing it for ever; the payload is the message
-- as it was read (bytea holds what text cannot), for an operator to repair and replay.
CREATE TABLE dead_turns (
    turn_id  text PRIMARY KEY,
    reason   text NOT NULL,
    payload  bytea NOT NULL,
    dead_at  timestamptz NOT NULL DEFAULT now()
);
