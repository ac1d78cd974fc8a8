-- One row per completed turn. turn_id is the idempotency key of the writer consumer:
-- a redelivered event inserts nothing.
CREATE TABLE turns (
    turn_id           text PRIMARY KEY,
    conversation_id   text NOT NULL,
    user_id           text NOT NULL,
    model             text NOT NULL,
    request_messages  jsonb NOT NULL,
    assistant         text NOT NULL,
    finish_reason     text NOT NULL,
    prompt_tokens     integer NOT NULL,
    completion_tokens integer NOT NULL,
    request_id        text NOT NULL DEFAULT '',
    created_at        timestamptz NOT NULL
);
CREATE INDEX turns_by_conversation ON turns (conversation_id, created_at);
CREATE INDEX turns_by_user ON turns (user_id, created_at);
