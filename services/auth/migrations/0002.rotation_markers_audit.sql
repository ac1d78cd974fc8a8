-- depends: 0001.api_keys
-- Rotation: the previous secret keeps working until previous_expires_at; `generation` counts rotations.
ALTER TABLE api_keys
    ADD COLUMN generation              integer NOT NULL DEFAULT 0,
    ADD COLUMN previous_hash           text,
    ADD COLUMN previous_pepper_version text,
    ADD COLUMN previous_expires_at     timestamptz,
    ADD COLUMN rotated_at              timestamptz;

-- The durable copy of the auth-change markers gateways judge cached credentials by (Redis holds the
-- fast copy; the auth service re-seeds it from here whenever Redis lost it).
CREATE TABLE auth_markers (
    field      text PRIMARY KEY,
    change     text NOT NULL,          -- AuthChange JSON
    at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX auth_markers_by_time ON auth_markers (at);

-- audit.events.v1, persisted idempotently (event_id)
CREATE TABLE audit_log (
    event_id    text PRIMARY KEY,
    action      text NOT NULL,
    actor       text NOT NULL,
    target      text,
    outcome     text NOT NULL,
    request_id  text NOT NULL,
    detail      jsonb NOT NULL DEFAULT '{}',
    at          timestamptz NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX audit_log_by_time ON audit_log (at);
CREATE INDEX audit_log_by_actor ON audit_log (actor, at);
