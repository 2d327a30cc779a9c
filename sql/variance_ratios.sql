-- variance_ratios: per SAE with logged latents, the three ratios of aggregated to
-- per-token layer variance side by side, and which of them the paper's "about 100" is:
--   ref_ratio    the reference code's A/B over 2048-token batches (reference_variant):
--                THE PAPER'S STATISTIC, the only one to set beside its ~100;
--   ratio_mass   OURS, mass-weighted: mean_j V_j / mean_j Vtok_j over live latents
--                (= variance_summary.ratio_token, from the stored sums);
--   ratio_count  OURS, count-weighted: mean_j Vc_j / mean_j Vtokc_j over live latents
--                (count_weighted_stats).
-- single_layer_share: the fraction of active token-latent pairs active at exactly one
-- layer (= token_layer_spread's fraction at n_layers = 1): the x axis of the calibration
-- (mlsae.calibration), which maps it to the three ratios on synthetic tables.
-- Cost: one GROUP BY per (token, latent) at query time (token_latent_moments, computed once).
-- depends: token_latent_moments, reference_variant, count_weighted_stats, variance_summary, tokens
-- Parameters: none (the reference's batch is 2048 tokens; for another T use
--   reference_variant_of(latents, tokens, batch_tokens := T)).
-- Columns: sae_id, single_layer_share, ref_ratio, ratio_mass, ratio_count, ref_n_batches,
--          ref_batch_tokens, ref_var_aggregated, ref_var_token, ref_rel_var,
--          mean_layer_var_count, mean_token_var_count.
CREATE OR REPLACE VIEW variance_ratios AS
WITH moments AS MATERIALIZED (FROM token_latent_moments),
share AS (
    SELECT sae_key, avg((n_rows = 1)::DOUBLE) AS single_layer_share
    FROM moments
    GROUP BY sae_key
),
counted AS (
    SELECT sae_id, avg(layer_var) AS mean_layer_var_count,
           avg(token_var) AS mean_token_var_count
    FROM count_weighted_stats_from(moments)
    GROUP BY sae_id
),
ref AS (FROM reference_variant_from(moments, tokens))
SELECT v.sae_id, s.single_layer_share, r.ref_ratio, v.ratio_token AS ratio_mass,
       c.mean_layer_var_count / c.mean_token_var_count AS ratio_count,
       r.ref_n_batches, r.ref_batch_tokens, r.ref_var_aggregated, r.ref_var_token,
       r.ref_rel_var, c.mean_layer_var_count, c.mean_token_var_count
FROM variance_summary v
JOIN ref r USING (sae_id)
LEFT JOIN share s ON s.sae_key = hash(v.sae_id)
LEFT JOIN counted c USING (sae_id);
