-- latent_stats: per (sae, latent) statistics of where the latent is active (SPEC 5).
--
--   expected_layer E_j = sum_l l p_j(l)                (the paper's Eq. 10)
--   layer_var      V_j = sum_l p_j(l) (l - E_j)^2      (two-pass, from latent_layers)
--   layer_std      sqrt(V_j);  relative_std = layer_std / L  (L = len(saes.layers))
--   token_var      Vtok_j    = sum_t m_tj V_tj / sum_t m_tj   (mass-weighted per-token variance)
--   prompt_var     Vprompt_j = sum_s m_sj V_sj / sum_s m_sj   (the same per sequence)
-- Law of total variance: layer_var = token_var + sum_t (m_tj/M_j)(E_tj - E_j)^2.
-- Latents that never fire have no row (see dead_latents). l = layer index 0..L-1.
--
-- The view is latent_stats_of(latent_seq_moments, latent_layers); the macro lets
-- variance_summary reuse one materialised pass over latent_seq_moments.
-- depends: latent_layers, latent_seq_moments, saes
-- Parameters: none (the macro: the two relations, by name).
-- Columns: sae_id, latent, count, mass, n_layers_active, expected_layer, layer_var,
--          layer_std, relative_std, token_var, prompt_var.
CREATE OR REPLACE MACRO latent_stats_of(seq_moments, layer_dist) AS TABLE
WITH dist AS (
    SELECT sae_id, latent, layer_idx, count, mass, p,
           sum(p * layer_idx) OVER (PARTITION BY sae_id, latent) AS e
    FROM query_table(layer_dist)
),
over_layers AS (
    SELECT sae_id, latent, sum(count) AS count, sum(mass) AS mass,
           count(*) AS n_layers_active, any_value(e) AS expected_layer,
           sum(p * (layer_idx - e) * (layer_idx - e)) AS layer_var
    FROM dist
    GROUP BY sae_id, latent
),
within AS (
    SELECT any_value(sae_id) AS sae_id, latent,
           sum(token_mv) / sum(mass) AS token_var,
           sum(prompt_mv) / sum(mass) AS prompt_var
    FROM query_table(seq_moments)
    GROUP BY sae_key, latent
)
SELECT o.sae_id, o.latent, o.count, o.mass, o.n_layers_active, o.expected_layer,
       o.layer_var, sqrt(o.layer_var) AS layer_std,
       sqrt(o.layer_var) / len(s.layers) AS relative_std,
       w.token_var, w.prompt_var
FROM over_layers o
JOIN within w USING (sae_id, latent)
JOIN saes s USING (sae_id);

CREATE OR REPLACE VIEW latent_stats AS
SELECT * FROM latent_stats_of(latent_seq_moments, latent_layers);
