-- dead_latents: latents that never (or rarely) fire on the logged tokens, including
-- latents with no row at all in `latents`.
--   frequency = n_fired / (n_tokens * L): the fraction of (token, layer) examples where
--   the latent's activation exceeds `threshold` (SPEC 2's 1e-3). Dead = frequency 0.
-- (Training's dead fraction counts the last 10M training tokens; this counts the
-- logged evaluation tokens.)
-- depends: latents, tokens, saes
-- Parameters: max_frequency := 0.0 (0 = dead only; e.g. 1e-5 for rare), threshold := 1e-3.
-- Usage: SELECT sae_id, count(*) FROM dead_latents() GROUP BY ALL;
-- Columns: sae_id, latent, count (positive rows), n_fired, max_value, frequency.
CREATE OR REPLACE MACRO dead_latents(max_frequency := 0.0, threshold := 1e-3) AS TABLE
WITH n_tok AS (
    SELECT sae_id, count(*) AS n_tokens FROM tokens GROUP BY sae_id
),
fired AS (
    SELECT any_value(sae_id) AS sae_id, latent, count(*) AS count,
           count_if(value > threshold) AS n_fired, max(value) AS max_value
    FROM latents
    GROUP BY hash(sae_id), latent
),
every_latent AS (
    SELECT sae_id, unnest(range(n_latents)) AS latent, len(layers) AS n_layers FROM saes
)
SELECT e.sae_id, e.latent, coalesce(f.count, 0) AS count, coalesce(f.n_fired, 0) AS n_fired,
       f.max_value, coalesce(f.n_fired, 0) / (t.n_tokens * e.n_layers) AS frequency
FROM every_latent e
JOIN n_tok t USING (sae_id)
LEFT JOIN fired f USING (sae_id, latent)
WHERE coalesce(f.n_fired, 0) / (t.n_tokens * e.n_layers) <= max_frequency
ORDER BY e.sae_id, frequency, e.latent;
