CREATE TABLE plans (
    name             text PRIMARY KEY,
    requests_per_min integer NOT NULL CHECK (requests_per_min > 0),
    tokens_per_day   bigint NOT NULL CHECK (tokens_per_day > 0),
    max_tokens       integer NOT NULL CHECK (max_tokens > 0),
    allowed_models   text[] NOT NULL DEFAULT '{}'   -- empty: every model
);

CREATE TABLE users (
    id         text PRIMARY KEY,
    name       text NOT NULL,
    plan       text NOT NULL REFERENCES plans (name),
    disabled   boolean NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT now()
);

INSERT INTO plans (name, requests_per_min, tokens_per_day, max_tokens) VALUES
    ('default', 600, 1000000, 4096),
    ('unlimited', 1000000, 1000000000000, 32768);

-- the operator: the stack's bootstrap admin key belongs to this user
INSERT INTO users (id, name, plan) VALUES ('usr_admin', 'admin', 'unlimited');
