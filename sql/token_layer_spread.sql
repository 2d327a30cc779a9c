-- token_layer_spread: for each SAE, how many of its SAE layers a latent is active at
-- within ONE token (SPEC 5's first finding: "latents are usually active at one layer for
-- a given token, but at different layers for different tokens").
--
-- A token-latent pair (t, j) is active at n layers when a[l,t,j] > 0 for n layers l.
-- fraction counts pairs; mass_fraction weighs each pair by m_tj = sum_l a[l,t,j] (the
-- weighting of token_var). Compare latent_stats.n_layers_active, the same count over
-- the whole data set. Cost: one GROUP BY per (token, latent), like latent_seq_moments.
-- depends: latents
-- Parameters: none.
-- Columns: sae_id, n_layers, token_latents, fraction, mass_fraction
CREATE OR REPLACE VIEW token_layer_spread AS
WITH per_token AS (
    SELECT sae_id, count(*) AS n_layers, sum(value::DOUBLE) AS mass
    FROM latents
    GROUP BY sae_id, seq_id, pos, latent
)
SELECT sae_id, n_layers, count(*) AS token_latents,
       count(*) / sum(count(*)) OVER (PARTITION BY sae_id) AS fraction,
       sum(mass) / sum(sum(mass)) OVER (PARTITION BY sae_id) AS mass_fraction
FROM per_token
GROUP BY sae_id, n_layers;
