CREATE TABLE models (
    id             text PRIMARY KEY,
    owned_by       text NOT NULL DEFAULT 'dualgate',
    context_length integer NOT NULL CHECK (context_length > 0),
    engine         text NOT NULL CHECK (engine IN ('cpu', 'synthetic', 'sglang')),
    served_model   text NOT NULL DEFAULT '',
    workers        jsonb NOT NULL DEFAULT '[]',
    params         jsonb NOT NULL DEFAULT '{}',
    fallback_model text REFERENCES models (id),
    enabled        boolean NOT NULL DEFAULT true,
    created_at     timestamptz NOT NULL DEFAULT now()
);

-- The defaults every stack starts with: the embedded CPU model, and the model-free engine
-- that benchmarks and drills use (named as such so nobody mistakes it for a model).
INSERT INTO models (id, owned_by, context_length, engine, served_model, params) VALUES
    ('smollm2-135m-instruct', 'HuggingFaceTB', 8192, 'cpu', 'SmolLM2-135M-Instruct', '{}'),
    ('synthetic', 'dualgate-synthetic-engine', 32768, 'synthetic', 'synthetic',
     '{"ttft_ms": 20, "itl_ms": 5, "tokens": 32}');
