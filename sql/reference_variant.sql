-- reference_variant: the reference code's statistic as the paper computes it (SPEC 5), so
-- that the paper's "about 100" has a like-for-like counterpart: A/B = 1 / mean_b(B_b/A_b)
-- over batches b of T = 2048 consecutive held-out tokens, over ALL n = saes.n_latents latents.
--
-- Batches: the paper's code takes one 2048-token sequence per batch. Our held-out sequences
-- are usually shorter, so each SAE's logged tokens (`tokens`, special tokens already left
-- out) are ordered by (seq_id, pos) and cut into consecutive batches of batch_tokens
-- tokens: a batch pools several sequences and may split one at its edges. The last,
-- shorter batch is dropped, unless there is no full batch (then the one batch of all
-- tokens is kept), so every batch has T = batch_tokens like the paper's.
-- Per batch b with T_b tokens, q_tj(l) = p_tj(l) where j is active at t, else 0:
--   var(q) = sum_l l^2 q(l) - (sum_l l q(l))^2, applied even when sum_l q != 1
--   A_b = (1/n) sum_j var((1/T_b) sum_{t in b} q_tj)
--       = (1/n) sum_j [ sum_t e2_tj / T_b - (sum_t e_tj / T_b)^2 ]   ("aggregated")
--   B_b = (1/n) sum_j (1/T_b) sum_{t in b} V_tj                       ("per token")
-- (e, e2, v from token_latent_moments; an inactive pair has q = 0 and adds nothing.)
-- A is not a variance (q-bar sums to the latent's active fraction), so A/B is not our
-- mass-weighted ratio (variance_summary.ratio_token); see SPEC 5.
-- variance_summary's ref_* columns are the same statistic per logged sequence (T = its
-- length), from the stored sums: not the paper's T.
--
-- Macros (relations by name):
--   reference_batches_from(moments, tokens_rel, batch_tokens := 2048): per (sae, batch)
--     from token_latent_moments rows and `tokens` rows;
--   reference_variant_from(moments, tokens_rel, batch_tokens := 2048): per sae;
--   reference_variant_of(latents_rel, tokens_rel, batch_tokens := 2048): the same from raw
--     `latents` rows, e.g. for a subset (filter tokens alike):
--     WITH l AS (FROM latents WHERE seq_id < 160), t AS (FROM tokens WHERE seq_id < 160)
--     FROM reference_variant_of(l, t);
-- Cost: one GROUP BY per (token, latent) (token_latent_moments), at query time.
-- depends: token_latent_moments, saes
-- Parameters: batch_tokens := 2048 (the paper's T).
-- Columns: reference_batches_from: sae_id, batch (0-based), t (T_b), a (A_b), b (B_b);
--   reference_variant_*: sae_id, ref_batch_tokens, ref_n_batches, ref_var_aggregated
--   (mean_b A_b), ref_var_token (mean_b B_b), ref_rel_var (mean_b B_b/A_b, the reference's
--   rel_var_t; batches with A_b = 0 are skipped), ref_ratio (1 / ref_rel_var: the paper's
--   A/B, NULL when ref_rel_var = 0).
CREATE OR REPLACE MACRO reference_batches_from(moments, tokens_rel, batch_tokens := 2048) AS TABLE
WITH token_batch AS (
    SELECT hash(sae_id) AS sae_key, seq_id, pos,
           (row_number() OVER (PARTITION BY hash(sae_id) ORDER BY seq_id, pos) - 1)
               // batch_tokens AS batch
    FROM query_table(tokens_rel)
),
batch_len AS (
    SELECT sae_key, batch, count(*) AS t
    FROM token_batch
    GROUP BY sae_key, batch
    QUALIFY t = batch_tokens OR max(t) OVER (PARTITION BY sae_key) < batch_tokens
),
per_latent AS (
    SELECT b.sae_key, b.batch, m.latent,
           sum(m.e) AS sum_e, sum(m.e2) AS sum_e2, sum(m.v) AS sum_v
    FROM query_table(moments) m
    JOIN token_batch b USING (sae_key, seq_id, pos)
    GROUP BY b.sae_key, b.batch, m.latent
),
per_batch AS (
    SELECT p.sae_key, p.batch,
           sum(p.sum_e2 / k.t - (p.sum_e / k.t) * (p.sum_e / k.t)) AS a_sum,
           sum(p.sum_v) / any_value(k.t) AS b_sum
    FROM per_latent p
    JOIN batch_len k USING (sae_key, batch)
    GROUP BY p.sae_key, p.batch
)
SELECT s.sae_id, k.batch, k.t::INTEGER AS t,
       coalesce(p.a_sum, 0.0) / s.n_latents AS a, coalesce(p.b_sum, 0.0) / s.n_latents AS b
FROM batch_len k
JOIN (SELECT sae_id, hash(sae_id) AS sae_key, n_latents FROM saes) s USING (sae_key)
LEFT JOIN per_batch p USING (sae_key, batch);

CREATE OR REPLACE MACRO reference_variant_from(moments, tokens_rel, batch_tokens := 2048) AS TABLE
WITH batches AS (FROM reference_batches_from(moments, tokens_rel, batch_tokens := batch_tokens)),
per_sae AS (
    SELECT sae_id, count(*) AS ref_n_batches, avg(a) AS ref_var_aggregated,
           avg(b) AS ref_var_token, avg(b / nullif(a, 0)) AS ref_rel_var
    FROM batches
    GROUP BY sae_id
)
SELECT sae_id, batch_tokens AS ref_batch_tokens, ref_n_batches, ref_var_aggregated,
       ref_var_token, ref_rel_var, 1.0 / nullif(ref_rel_var, 0) AS ref_ratio
FROM per_sae;

CREATE OR REPLACE MACRO reference_variant_of(latents_rel, tokens_rel, batch_tokens := 2048) AS TABLE
WITH moments AS MATERIALIZED (FROM token_latent_moments_of(latents_rel))
FROM reference_variant_from(moments, tokens_rel, batch_tokens := batch_tokens);

CREATE OR REPLACE VIEW reference_variant AS
SELECT * FROM reference_variant_of(latents, tokens);
