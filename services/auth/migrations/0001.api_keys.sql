-- API keys: only an HMAC of the secret is stored, with the pepper version that made it.
CREATE TABLE api_keys (
    key_id         text PRIMARY KEY,
    user_id        text NOT NULL,
    name           text NOT NULL,
    secret_hash    text NOT NULL,
    pepper_version text NOT NULL,
    scopes         text[] NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    revoked_at     timestamptz
);
CREATE INDEX api_keys_by_user ON api_keys (user_id);
