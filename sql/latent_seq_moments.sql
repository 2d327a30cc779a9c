-- latent_seq_moments: per (sae, sequence, latent), sums over the sequence's tokens that
-- latent_stats_of, latent_var_sums_of and seq_sums_of are built from (SPEC 5), computed
-- on the fly from the raw `latents` rows. l = layer index 0..L-1 (see sae_layers).
--
-- For token t and latent j: m_tj = sum_l a[l,t,j], p_tj(l) = a[l,t,j] / m_tj,
-- E_tj = sum_l l p_tj(l), V_tj = sum_l l^2 p_tj(l) - E_tj^2. The prompt pools its
-- tokens: m_sj, E_sj, V_sj likewise. A variance is exactly 0 when only one layer is
-- involved (a token-latent with one row; layer_mask with one bit), and rounding never
-- makes one negative. This per-(token, latent) GROUP BY is the one expensive step of the
-- analyses: the headline views read the per-part sums the logger stores instead (see
-- part_sums.sql); use this view, or the macro on a filtered relation, for ad-hoc
-- analyses of a subset of sequences. SAEs over at most 127 layers (layer_mask is a
-- HUGEINT bit set; the stored sums have no such limit).
-- depends: latents, sae_layers, saes
-- Parameters: none (the macro: a relation with the columns of `latents`, by name).
-- Usage: WITH sub AS (FROM latents WHERE seq_id < 100) FROM latent_seq_moments_of(sub);
-- Columns:
--   sae_id, sae_key, seq_id, latent
--   count      active (token, layer) rows          n_tokens   tokens with m_tj > 0
--   mass       m_sj = sum_t m_tj                   s1, s2     sum_t sum_l l a, sum_t sum_l l^2 a
--   layer_mask bit l set if active at layer l      token_mv   sum_t m_tj V_tj
--   prompt_mv  m_sj V_sj
--   sum_e      sum_t E_tj                          sum_e2     sum_t sum_l l^2 p_tj(l)
--   sum_v      sum_t V_tj                          (the last three: the reference variant)
CREATE OR REPLACE MACRO latent_seq_moments_of(latents_rel) AS TABLE
WITH active AS (
    SELECT s.sae_key, l.seq_id, l.pos, l.latent,
           l.value::DOUBLE AS a, s.layer_idx::DOUBLE AS i, s.layer_idx::HUGEINT AS bit
    FROM query_table(latents_rel) l
    JOIN sae_layers s ON hash(l.sae_id) = s.sae_key AND l.layer = s.layer
),
per_token AS (
    SELECT sae_key, seq_id, latent,
           count(*) AS count, sum(a) AS m, sum(a * i) AS s1, sum(a * i * i) AS s2,
           bit_or(1::HUGEINT << bit) AS layer_mask
    FROM active
    GROUP BY sae_key, seq_id, pos, latent
),
per_token_var AS (
    -- m V = s2 - s1^2/m; one row = one layer (rows are unique per token, layer, latent)
    SELECT *, CASE WHEN count = 1 THEN 0.0 ELSE greatest(s2 - s1 * s1 / m, 0.0) END AS mv
    FROM per_token
),
per_seq AS (
    SELECT sae_key, seq_id, latent,
           sum(count)::BIGINT AS count, count(*) AS n_tokens, sum(m) AS mass,
           sum(s1) AS s1, sum(s2) AS s2, bit_or(layer_mask) AS layer_mask,
           sum(mv) AS token_mv,
           CASE WHEN bit_count(bit_or(layer_mask)) = 1 THEN 0.0
                ELSE greatest(sum(s2) - sum(s1) * sum(s1) / sum(m), 0.0) END AS prompt_mv,
           sum(s1 / m) AS sum_e, sum(s2 / m) AS sum_e2, sum(mv / m) AS sum_v
    FROM per_token_var
    GROUP BY sae_key, seq_id, latent
)
SELECT s.sae_id, p.*
FROM per_seq p
JOIN (SELECT sae_id, hash(sae_id) AS sae_key FROM saes) s USING (sae_key);

CREATE OR REPLACE VIEW latent_seq_moments AS
SELECT * FROM latent_seq_moments_of(latents);
