-- count_weighted_stats: per (sae, latent), SPEC 5's "count-weighted version" of the layer
-- statistics: each active token counts 1 instead of its mass m_tj (OURS, like
-- latent_stats; properly normalised, so NOT the paper's reference statistic, see
-- reference_variant).
--
-- Over the C_j tokens where latent j is active (e, e2, v from token_latent_moments):
--   expected_layer Ec_j = (1/C_j) sum_t E_tj
--   layer_var      Vc_j = (1/C_j) sum_t e2_tj - Ec_j^2   (variance of the layer under the
--                  token-averaged distribution (1/C_j) sum_t p_tj; exactly 0 if j is only
--                  ever active at one layer)
--   token_var      Vtokc_j = (1/C_j) sum_t V_tj
-- Law of total variance: layer_var = token_var + the (unweighted) variance of E_tj over t.
-- The reference's per-latent A_j and B_j are f_j [Vc_j + (1 - f_j) Ec_j^2] and
-- f_j Vtokc_j with f_j = C_j / T (SPEC 5).
-- Macro: count_weighted_stats_from(moments), from token_latent_moments rows, e.g. of a
--   subset: WITH m AS (FROM token_latent_moments WHERE seq_id < 100)
--           FROM count_weighted_stats_from(m);
-- Cost: one GROUP BY per (token, latent) (token_latent_moments), at query time.
-- depends: token_latent_moments, saes
-- Parameters: none (the macro: a relation with token_latent_moments' columns, by name).
-- Columns: sae_id, latent, n_tokens (C_j), expected_layer, layer_var, token_var.
CREATE OR REPLACE MACRO count_weighted_stats_from(moments) AS TABLE
WITH per_latent AS (
    SELECT sae_key, latent, count(*) AS n_tokens, sum(e) AS sum_e, sum(e2) AS sum_e2,
           sum(v) AS sum_v, min(lo) = max(hi) AS one_layer
    FROM query_table(moments)
    GROUP BY sae_key, latent
)
SELECT s.sae_id, p.latent, p.n_tokens, p.sum_e / p.n_tokens AS expected_layer,
       CASE WHEN p.one_layer THEN 0.0
            ELSE greatest(p.sum_e2 / p.n_tokens - (p.sum_e / p.n_tokens) ** 2, 0.0)
       END AS layer_var,
       p.sum_v / p.n_tokens AS token_var
FROM per_latent p
JOIN (SELECT sae_id, hash(sae_id) AS sae_key FROM saes) s USING (sae_key);

CREATE OR REPLACE VIEW count_weighted_stats AS
SELECT * FROM count_weighted_stats_from(token_latent_moments);
