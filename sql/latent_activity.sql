-- latent_activity: per SAE with logged latents, how multi-layer its latents are (SPEC 5's
-- first finding, and the paper's finding 3 across models):
--   n_live               latents active at least once (latent_stats rows)
--   mean_layers_active   mean over live latents of the layers each fired at (all tokens)
--   latent_one_layer     share of live latents active at one layer over ALL tokens
--   mean_layer_std       mean over live latents of the layer std (layers);
--   mean_relative_std    the same divided by L (comparable across depths)
--   single_layer_share   share of active token-latent pairs active at ONE layer within the
--                        token (token_layer_spread at n_layers = 1; = variance_ratios'
--                        single_layer_share); single_layer_mass_share weighs pairs by mass
--   mean_token_layers    mean layers per active token-latent pair
-- depends: latent_stats, token_layer_spread
-- Parameters: none.
-- Columns: sae_id, n_live, mean_layers_active, latent_one_layer, mean_layer_std,
--          mean_relative_std, single_layer_share, single_layer_mass_share, mean_token_layers.
CREATE OR REPLACE VIEW latent_activity AS
WITH per_latent AS (
    SELECT sae_id, count(*) AS n_live, avg(n_layers_active) AS mean_layers_active,
           avg((n_layers_active = 1)::DOUBLE) AS latent_one_layer,
           avg(layer_std) AS mean_layer_std, avg(relative_std) AS mean_relative_std
    FROM latent_stats
    GROUP BY sae_id
),
per_token AS (
    SELECT sae_id,
           sum(fraction) FILTER (WHERE n_layers = 1) AS single_layer_share,
           sum(mass_fraction) FILTER (WHERE n_layers = 1) AS single_layer_mass_share,
           sum(fraction * n_layers) AS mean_token_layers
    FROM token_layer_spread
    GROUP BY sae_id
)
SELECT l.sae_id, l.n_live, l.mean_layers_active, l.latent_one_layer, l.mean_layer_std,
       l.mean_relative_std, coalesce(t.single_layer_share, 0.0) AS single_layer_share,
       coalesce(t.single_layer_mass_share, 0.0) AS single_layer_mass_share,
       t.mean_token_layers
FROM per_latent l
LEFT JOIN per_token t USING (sae_id);
