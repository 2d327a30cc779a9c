-- latent_stats: per (sae, latent) statistics of where the latent is active (SPEC 5).
--
--   expected_layer E_j = sum_l l p_j(l)                (the paper's Eq. 10)
--   layer_var      V_j = sum_l l^2 p_j(l) - E_j^2      (exactly 0 if active at one layer)
--   layer_std      sqrt(V_j);  relative_std = layer_std / L  (L = len(saes.layers))
--   token_var      Vtok_j    = sum_t m_tj V_tj / sum_t m_tj   (mass-weighted per-token variance)
--   prompt_var     Vprompt_j = sum_s m_sj V_sj / sum_s m_sj   (the same per sequence)
--   n_layers_active  layers at which the latent fired at least once
-- Law of total variance: layer_var = token_var + sum_t (m_tj/M_j)(E_tj - E_j)^2.
-- Latents that never fire have no row (see dead_latents). l = layer index 0..L-1.
--
-- Three macros, one formula (latent_stats_from):
--   latent_stats_from(per_latent): the statistics from per (sae_key, latent) sums
--     count, mass, s1 = sum l a, s2 = sum l^2 a, n_layers_active, token_mv, prompt_mv;
--   latent_stats_from_sums(layer_sums, var_sums): those sums from relations shaped like
--     the stored tables latent_layer_sums and latent_var_sums (part_sums.sql): what the
--     view reads, a few rows per (part, latent), no per-token work at query time;
--   latent_stats_of(seq_moments): those sums on the fly from latent_seq_moments rows
--     (the ground truth, and the tool for a FILTERED subset of sequences):
--     WITH sub AS (FROM latent_seq_moments WHERE seq_id < 100) FROM latent_stats_of(sub);
-- depends: latent_layers, latent_var_sums, saes, part_sums
-- Parameters: none (the macros: relations by name, as above).
-- Columns: sae_id, latent, count, mass, n_layers_active, expected_layer, layer_var,
--          layer_std, relative_std, token_var, prompt_var.
CREATE OR REPLACE MACRO latent_stats_from(per_latent) AS TABLE
WITH with_var AS (
    SELECT *, s1 / mass AS expected_layer,
           CASE WHEN n_layers_active = 1 THEN 0.0
                ELSE greatest(s2 - s1 * s1 / mass, 0.0) / mass END AS layer_var
    FROM query_table(per_latent)
)
SELECT s.sae_id, v.latent, v.count::BIGINT AS count, v.mass,
       v.n_layers_active::SMALLINT AS n_layers_active, v.expected_layer,
       v.layer_var, sqrt(v.layer_var) AS layer_std,
       sqrt(v.layer_var) / len(s.layers) AS relative_std,
       v.token_mv / v.mass AS token_var, v.prompt_mv / v.mass AS prompt_var
FROM with_var v
JOIN (SELECT sae_id, hash(sae_id) AS sae_key, layers FROM saes) s USING (sae_key);

CREATE OR REPLACE MACRO latent_stats_from_sums(layer_sums, var_sums) AS TABLE
WITH per_latent_layers AS (
    SELECT hash(sae_id) AS sae_key, latent, sum(count) AS count, sum(mass) AS mass,
           sum(mass * layer_idx) AS s1, sum(mass * layer_idx * layer_idx) AS s2,
           count(*) AS n_layers_active
    FROM latent_layers_of(layer_sums)
    GROUP BY ALL
),
per_latent_var AS (
    SELECT hash(sae_id) AS sae_key, latent,
           sum(token_mv) AS token_mv, sum(prompt_mv) AS prompt_mv
    FROM query_table(var_sums)
    GROUP BY ALL
),
per_latent AS (
    SELECT * FROM per_latent_layers JOIN per_latent_var USING (sae_key, latent)
)
SELECT * FROM latent_stats_from(per_latent);

CREATE OR REPLACE MACRO latent_stats_of(seq_moments) AS TABLE
WITH per_latent AS (
    SELECT sae_key, latent, sum(count) AS count, sum(mass) AS mass,
           sum(s1) AS s1, sum(s2) AS s2, bit_count(bit_or(layer_mask)) AS n_layers_active,
           sum(token_mv) AS token_mv, sum(prompt_mv) AS prompt_mv
    FROM query_table(seq_moments)
    GROUP BY sae_key, latent
)
SELECT * FROM latent_stats_from(per_latent);

CREATE OR REPLACE VIEW latent_stats AS
SELECT * FROM latent_stats_from_sums(latent_layer_sums, latent_var_sums);
