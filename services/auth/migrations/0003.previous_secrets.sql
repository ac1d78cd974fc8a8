-- depends: 0002.rotation_markers_audit
-- A rotation never shortens the grace it promised: every secret a rotation moved aside keeps working
-- until its own expires_at, however many rotations follow. (One previous secret per key meant a second
-- rotation cut the first one's secret off at once.)
CREATE TABLE previous_secrets (
    key_id         text NOT NULL REFERENCES api_keys (key_id) ON DELETE CASCADE,
    generation     integer NOT NULL,          -- the key's generation while this was its secret
    secret_hash    text NOT NULL,
    pepper_version text NOT NULL,
    expires_at     timestamptz NOT NULL,
    PRIMARY KEY (key_id, generation)
);
INSERT INTO previous_secrets (key_id, generation, secret_hash, pepper_version, expires_at)
    SELECT key_id, generation - 1, previous_hash, previous_pepper_version, previous_expires_at FROM api_keys
    WHERE previous_hash IS NOT NULL AND previous_expires_at > now();
ALTER TABLE api_keys DROP COLUMN previous_hash, DROP COLUMN previous_pepper_version,
                     DROP COLUMN previous_expires_at;

-- A rotation retried with the same Idempotency-Key gets the first answer instead of rotating again. The
-- answer holds the new secret, so it is kept sealed (AES-GCM, a key derived from the pepper version
-- named) and only for a day (services/auth/rotations.py).
CREATE TABLE key_rotations (
    key_id          text NOT NULL REFERENCES api_keys (key_id) ON DELETE CASCADE,
    idempotency_key text NOT NULL,
    request_hash    text NOT NULL,
    pepper_version  text NOT NULL,
    sealed_answer   bytea NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (key_id, idempotency_key)
);
