-- part_sums: the additive sums the logger stores beside every part of `latents`, so the
-- headline views group a few rows per (part, latent) instead of every (token, latent).
--
-- mlsae.part_sums computes, for each part file of `latents` (and `tokens`), in DuckDB:
--   table latent_layer_sums = latent_layer_sums_of(<the part's latents>)
--   table latent_var_sums   = latent_var_sums_of(latent_seq_moments_of(<the part's latents>))
--   table seq_sums          = seq_sums_of(<that seq-moments relation>, <the part's tokens>)
-- and writes them as <table>/sae_id=<id>/part-i.parquet. Parts split the data by
-- sequence, so sums over parts = sums over the whole table (seq_sums rows are per
-- sequence: one part each). The same macros over a filtered relation give the sums of a
-- subset (see latent_layers_of, latent_stats_from_sums, variance_summary_of).
--
--   latent_layer_sums_of(latents_rel): per (sae, latent, layer)
--       count = C_j(l) (active rows), mass = M_j(l) = sum a
--   latent_var_sums_of(seq_moments): per (sae, latent)
--       token_mv = sum_t m_tj V_tj, prompt_mv = sum_s m_sj V_sj
--   seq_sums_of(seq_moments, tokens_rel): per (sae, sequence with tokens), for SPEC 5's
--       reference variant: t = T_s (logged tokens), a_sum_t = T_s * sum_j var(Q_sj)
--       = sum_j (sum_e2 - sum_e^2 / T_s) with Q_sj = (1/T_s) sum_t q_tj, and
--       b_sum_t = sum_j sum_t V_tj (0 for a sequence where nothing fired).
-- depends: latent_seq_moments
-- Parameters: relations by name, as above.
-- Columns: latent_layer_sums_of: sae_id, latent, layer, count, mass;
--          latent_var_sums_of: sae_id, latent, token_mv, prompt_mv;
--          seq_sums_of: sae_id, seq_id, t, a_sum_t, b_sum_t.
CREATE OR REPLACE MACRO latent_layer_sums_of(latents_rel) AS TABLE
SELECT any_value(sae_id) AS sae_id, latent, layer,
       count(*) AS count, sum(value::DOUBLE) AS mass
FROM query_table(latents_rel)
GROUP BY hash(sae_id), latent, layer;

CREATE OR REPLACE MACRO latent_var_sums_of(seq_moments) AS TABLE
SELECT any_value(sae_id) AS sae_id, latent,
       sum(token_mv) AS token_mv, sum(prompt_mv) AS prompt_mv
FROM query_table(seq_moments)
GROUP BY sae_key, latent;

CREATE OR REPLACE MACRO seq_sums_of(seq_moments, tokens_rel) AS TABLE
WITH seq_len AS (
    SELECT any_value(sae_id) AS sae_id, hash(sae_id) AS sae_key, seq_id, count(*) AS t
    FROM query_table(tokens_rel)
    GROUP BY hash(sae_id), seq_id
),
per_seq AS (
    SELECT sae_key, seq_id,
           sum(m.sum_e2 - m.sum_e * m.sum_e / s.t) AS a_sum_t, sum(m.sum_v) AS b_sum_t
    FROM query_table(seq_moments) m
    JOIN seq_len s USING (sae_key, seq_id)
    GROUP BY sae_key, seq_id
)
SELECT s.sae_id, s.seq_id, s.t::INTEGER AS t,
       coalesce(p.a_sum_t, 0.0) AS a_sum_t, coalesce(p.b_sum_t, 0.0) AS b_sum_t
FROM seq_len s
LEFT JOIN per_seq p USING (sae_key, seq_id);
