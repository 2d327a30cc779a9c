-- token_latent_moments: one row per active (sae, token, latent) pair, the layer moments of
-- that one token (SPEC 5 "per token"), computed on the fly from the raw `latents` rows.
-- The like-for-like statistics (reference_variant, count_weighted_stats, variance_ratios)
-- are built from it; the headline views read the stored per-part sums instead.
--
-- For token t and latent j: m_tj = sum_l a[l,t,j], p_tj(l) = a[l,t,j] / m_tj,
--   e  = E_tj = sum_l l p_tj(l)      e2 = sum_l l^2 p_tj(l)      v = V_tj = e2 - e^2
-- with l = layer index 0..L-1 (see sae_layers). A pair active at one layer (n_rows = 1)
-- gets e = l, e2 = l^2 and v = 0 exactly (no rounding through a / a); rounding never
-- makes v negative. Cost: one GROUP BY per (token, latent), like latent_seq_moments.
-- depends: latents, sae_layers
-- Parameters: none (the macro: a relation with the columns of `latents`, by name).
-- Usage: WITH sub AS (FROM latents WHERE seq_id < 100) FROM token_latent_moments_of(sub);
-- Columns: sae_key (= hash(sae_id)), seq_id, pos, latent, n_rows (layers active),
--          lo, hi (lowest and highest active layer index), m, e, e2, v.
CREATE OR REPLACE MACRO token_latent_moments_of(latents_rel) AS TABLE
WITH active AS (
    SELECT s.sae_key, l.seq_id, l.pos, l.latent,
           l.value::DOUBLE AS a, s.layer_idx::DOUBLE AS i
    FROM query_table(latents_rel) l
    JOIN sae_layers s ON hash(l.sae_id) = s.sae_key AND l.layer = s.layer
),
per_token AS (
    SELECT sae_key, seq_id, pos, latent, count(*) AS n_rows, min(i) AS lo, max(i) AS hi,
           sum(a) AS m, sum(a * i) AS s1, sum(a * i * i) AS s2
    FROM active
    GROUP BY sae_key, seq_id, pos, latent
)
SELECT sae_key, seq_id, pos, latent, n_rows, lo, hi, m,
       CASE WHEN n_rows = 1 THEN lo ELSE s1 / m END AS e,
       CASE WHEN n_rows = 1 THEN lo * lo ELSE s2 / m END AS e2,
       CASE WHEN n_rows = 1 THEN 0.0 ELSE greatest(s2 - s1 * s1 / m, 0.0) / m END AS v
FROM per_token;

CREATE OR REPLACE VIEW token_latent_moments AS
SELECT * FROM token_latent_moments_of(latents);
