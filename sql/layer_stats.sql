-- layer_stats: per (sae, layer) activation statistics over the logged tokens.
--   l0 = (rows with value > 1e-3) / n_tokens: the mean number of latents firing per
--   (unmasked) token at that layer, SPEC 4's L0; on the same tokens it equals the
--   evaluation's L0, shown beside it as eval_l0 (layer_metrics.l0, NULL if not evaluated).
-- depends: latents, tokens, sae_layers, layer_metrics
-- Parameters: none.
-- Columns: sae_id, layer (model block), layer_idx, n_tokens, n_active (positive rows),
--          l0, eval_l0, mass, mean_value, max_value, n_latents_active.
CREATE OR REPLACE VIEW layer_stats AS
WITH n_tok AS (
    SELECT sae_id, count(*) AS n_tokens FROM tokens GROUP BY sae_id
),
per_layer AS (
    SELECT any_value(sae_id) AS sae_id, layer, count(*) AS n_active,
           count_if(value > 1e-3) AS n_fired, sum(value::DOUBLE) AS mass,
           max(value) AS max_value, count(DISTINCT latent) AS n_latents_active
    FROM latents
    GROUP BY hash(sae_id), layer
)
SELECT s.sae_id, s.layer, s.layer_idx, t.n_tokens,
       coalesce(p.n_active, 0) AS n_active,
       coalesce(p.n_fired, 0) / t.n_tokens AS l0,
       m.l0 AS eval_l0,
       coalesce(p.mass, 0.0) AS mass,
       p.mass / p.n_active AS mean_value,
       p.max_value,
       coalesce(p.n_latents_active, 0) AS n_latents_active
FROM sae_layers s
JOIN n_tok t USING (sae_id)
LEFT JOIN per_layer p USING (sae_id, layer)
LEFT JOIN layer_metrics m USING (sae_id, layer)
ORDER BY s.sae_id, s.layer_idx;
