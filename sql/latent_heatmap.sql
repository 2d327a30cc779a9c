-- latent_heatmap: data for Fig. 2, the aggregated distribution p_j(l) of every live
-- latent over the layers, latents ordered by expected layer (then id).
-- Dense: one row per (live latent, layer), p = 0 where the latent never fired.
-- depends: latent_layers, sae_layers
-- Parameters: none.
-- Columns: sae_id, rank (0-based position in the E_j order), latent, expected_layer,
--          layer (model block), layer_idx (0..L-1), p.
CREATE OR REPLACE VIEW latent_heatmap AS
WITH dist AS MATERIALIZED (
    SELECT sae_id, latent, layer, p, sum(p * layer_idx) OVER (PARTITION BY sae_id, latent) AS e
    FROM latent_layers
),
ranked AS (
    SELECT sae_id, latent, any_value(e) AS expected_layer,
           row_number() OVER (PARTITION BY sae_id ORDER BY any_value(e), latent) - 1 AS rank
    FROM dist
    GROUP BY sae_id, latent
)
SELECT r.sae_id, r.rank, r.latent, r.expected_layer, s.layer, s.layer_idx,
       coalesce(d.p, 0.0) AS p
FROM ranked r
JOIN sae_layers s USING (sae_id)
LEFT JOIN dist d USING (sae_id, latent, layer);
