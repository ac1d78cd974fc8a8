-- depends: 0001.users
-- The usage ledger: one row per usage event (usage.events.v1), idempotent on event id.
CREATE TABLE usage_ledger (
    event_id          text PRIMARY KEY,
    user_id           text NOT NULL,
    key_id            text,
    model             text NOT NULL,
    prompt_tokens     bigint NOT NULL CHECK (prompt_tokens >= 0),
    completion_tokens bigint NOT NULL CHECK (completion_tokens >= 0),
    day               date NOT NULL,          -- the UTC day the tokens count against
    created_at        timestamptz NOT NULL,
    recorded_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX usage_ledger_by_user_day ON usage_ledger (user_id, day);
