-- Conversations a user created; turns of a conversation share its id. A deleted conversation keeps
-- a tombstone row so turns still in flight (spool, Kafka) are recognised and not written back.
CREATE TABLE conversations (
    id            text PRIMARY KEY,
    user_id       text NOT NULL,
    title         text NOT NULL DEFAULT '',
    system_prompt text NOT NULL DEFAULT '',
    metadata      jsonb NOT NULL DEFAULT '{}',
    created_at    timestamptz NOT NULL DEFAULT now(),
    deleted_at    timestamptz
);
CREATE INDEX conversations_by_user ON conversations (user_id, created_at DESC) WHERE deleted_at IS NULL;

ALTER TABLE turns ADD COLUMN idempotency_key text NOT NULL DEFAULT '';
ALTER TABLE turns ADD COLUMN request_hash text NOT NULL DEFAULT '';
ALTER TABLE turns ADD COLUMN completion_id text NOT NULL DEFAULT '';
-- one stored answer per (user, Idempotency-Key)
CREATE UNIQUE INDEX turns_idempotency ON turns (user_id, idempotency_key) WHERE idempotency_key <> '';
