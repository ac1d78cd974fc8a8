-- The fallback layer that gave a turn's answer (model-fallback, cache, simplified), '' for the
-- requested model's own: the history shows an answer as degraded as the client saw it.
ALTER TABLE turns ADD COLUMN degraded text NOT NULL DEFAULT '';
