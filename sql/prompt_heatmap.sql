-- prompt_heatmap: data for Fig. 3, the distribution over layers of each latent pooled
-- over the tokens of ONE logged sequence (SPEC 5 "per prompt": p_sj(l) = m_sj(l) / m_sj),
-- latents whose maximum activation in the sequence is below `threshold` excluded,
-- ordered by their expected layer within the sequence. Dense over the SAE's layers.
-- depends: latents, sae_layers
-- Parameters: sae (sae_id), seq (seq_id), threshold := 1e-3.
-- Usage: SELECT * FROM prompt_heatmap('my-sae', 0);
-- Columns: sae_id, seq_id, rank, latent, max_value, mass, expected_layer,
--          layer (model block), layer_idx, p.
CREATE OR REPLACE MACRO prompt_heatmap(sae, seq, threshold := 1e-3) AS TABLE
WITH active AS MATERIALIZED (
    SELECT l.latent, l.layer, s.layer_idx, l.value::DOUBLE AS a
    FROM latents l
    JOIN sae_layers s USING (sae_id, layer)
    WHERE l.sae_id = sae AND l.seq_id = seq
),
per_latent AS (
    SELECT latent, max(a) AS max_value, sum(a) AS mass,
           sum(a * layer_idx) / sum(a) AS expected_layer
    FROM active
    GROUP BY latent
),
ranked AS (
    SELECT *, row_number() OVER (ORDER BY expected_layer, latent) - 1 AS rank
    FROM per_latent
    WHERE max_value >= threshold
),
per_layer AS (
    SELECT latent, layer, sum(a) AS mass_l FROM active GROUP BY latent, layer
)
SELECT sae AS sae_id, seq AS seq_id, r.rank, r.latent, r.max_value, r.mass, r.expected_layer,
       s.layer, s.layer_idx, coalesce(pl.mass_l, 0.0) / r.mass AS p
FROM ranked r
CROSS JOIN (SELECT layer, layer_idx FROM sae_layers WHERE sae_id = sae) s
LEFT JOIN per_layer pl ON pl.latent = r.latent AND pl.layer = s.layer
ORDER BY r.rank, s.layer_idx;
