-- variance_summary: per SAE, the paper's headline comparison of how spread over layers
-- latents are in aggregate vs. within a token / a prompt (SPEC 5), and the reference
-- code's variant beside it.
--
-- Logged tokens: n_tokens (sum of T_s over seq_sums; 0 = this SAE's latents are not
-- logged, e.g. the report's single-layer baselines: then n_live, ref_n_sequences and every
-- statistic are NULL, "not logged", rather than 0 live latents).
-- Over live latents (those in latent_stats, i.e. active at least once):
--   n_live, mean_layer_var, mean_prompt_var, mean_token_var,
--   ratio_token  = mean_layer_var / mean_token_var   (OURS, mass-weighted: never set it
--                  against the paper's ~100, which is variance_ratios.ref_ratio)
--   ratio_prompt = mean_layer_var / mean_prompt_var
--   mean_layer_std, std_layer_std (population std over latents), mean_relative_std
-- Reference variant, per logged sequence s with T_s tokens, over ALL n = saes.n_latents
-- latents (a latent not active at t has q_tj = 0; var(q) = sum l^2 q - (sum l q)^2):
--   A_s = (1/n) sum_j var((1/T_s) sum_t q_tj)     B_s = (1/n) sum_j (1/T_s) sum_t var(q_tj)
--   ref_var_aggregated = mean_s A_s,  ref_var_token = mean_s B_s,
--   ref_rel_var = mean_s (B_s / A_s)  (the reference code's rel_var_t; sequences with
--   A_s = 0 are skipped), ref_n_sequences.
-- Per logged sequence, i.e. at T = the sequence length: the paper's T is 2048 tokens, so
-- compare with the paper through reference_variant (2048-token batches), not these.
-- The view reads latent_stats and the stored per-sequence sums (table seq_sums, see
-- part_sums.sql). The macro takes any such pair, e.g. for a subset of sequences:
--   WITH m AS MATERIALIZED (FROM latent_seq_moments WHERE seq_id < 100),
--        tok AS (FROM tokens WHERE seq_id < 100),
--        st AS (FROM latent_stats_of(m)), ss AS (FROM seq_sums_of(m, tok))
--   FROM variance_summary_of(st, ss);
-- depends: latent_stats, seq_sums, saes, part_sums
-- Parameters: none (the macro: a latent_stats relation and a seq_sums relation, by name).
-- Columns: sae_id, n_latents, n_tokens, n_live, mean_layer_var, mean_prompt_var, mean_token_var,
--          ratio_token, ratio_prompt, mean_layer_std, std_layer_std, mean_relative_std,
--          ref_n_sequences, ref_var_aggregated, ref_var_token, ref_rel_var.
CREATE OR REPLACE MACRO variance_summary_of(stats, seq_sums) AS TABLE
WITH live AS (
    SELECT sae_id, count(*) AS n_live,
           avg(layer_var) AS mean_layer_var, avg(prompt_var) AS mean_prompt_var,
           avg(token_var) AS mean_token_var,
           avg(layer_std) AS mean_layer_std, stddev_pop(layer_std) AS std_layer_std,
           avg(relative_std) AS mean_relative_std
    FROM query_table(stats)
    GROUP BY sae_id
),
ref AS (
    SELECT q.sae_id, count(*) AS n_seq, sum(q.t) AS n_tokens,
           avg(q.a_sum_t / (q.t * x.n_latents)) AS a,
           avg(q.b_sum_t / (q.t * x.n_latents)) AS b,
           avg(q.b_sum_t / nullif(q.a_sum_t, 0)) AS b_over_a
    FROM query_table(seq_sums) q
    JOIN saes x USING (sae_id)
    GROUP BY q.sae_id
)
SELECT s.sae_id, s.n_latents, coalesce(r.n_tokens, 0)::BIGINT AS n_tokens,
       CASE WHEN r.n_seq IS NOT NULL THEN coalesce(l.n_live, 0) END AS n_live,
       l.mean_layer_var, l.mean_prompt_var, l.mean_token_var,
       l.mean_layer_var / l.mean_token_var AS ratio_token,
       l.mean_layer_var / l.mean_prompt_var AS ratio_prompt,
       l.mean_layer_std, l.std_layer_std, l.mean_relative_std,
       r.n_seq AS ref_n_sequences,
       r.a AS ref_var_aggregated, r.b AS ref_var_token, r.b_over_a AS ref_rel_var
FROM saes s
LEFT JOIN live l USING (sae_id)
LEFT JOIN ref r USING (sae_id);

CREATE OR REPLACE VIEW variance_summary AS
SELECT * FROM variance_summary_of(latent_stats, seq_sums);
