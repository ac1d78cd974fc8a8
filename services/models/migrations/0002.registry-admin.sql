-- Admin-managed registry: how each model's tokens are counted, and when a row last changed.
ALTER TABLE models ADD COLUMN tokenizer text NOT NULL DEFAULT '';
ALTER TABLE models ADD COLUMN updated_at timestamptz NOT NULL DEFAULT now();

-- the CPU model's tokenizer sits in its dequantized checkpoint under the model cache;
-- the synthetic engine counts words
UPDATE models SET tokenizer = 'SmolLM2-135M-Instruct.Q4_1' WHERE id = 'smollm2-135m-instruct';
UPDATE models SET tokenizer = 'words' WHERE id = 'synthetic';
