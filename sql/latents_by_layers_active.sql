-- latents_by_layers_active: per SAE, how many live latents fire at 1, 2, ... of its layers
-- over all logged tokens (the histogram of latent_stats.n_layers_active; compare
-- token_layer_spread, the same count within one token).
-- depends: latent_stats
-- Parameters: none.
-- Columns: sae_id, n_layers_active, latents, fraction (of the SAE's live latents).
CREATE OR REPLACE VIEW latents_by_layers_active AS
SELECT sae_id, n_layers_active, count(*) AS latents,
       count(*) / sum(count(*)) OVER (PARTITION BY sae_id) AS fraction
FROM latent_stats
GROUP BY sae_id, n_layers_active;
