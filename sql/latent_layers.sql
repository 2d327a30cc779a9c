-- latent_layers: the distribution of each latent over layers, aggregated over all
-- logged tokens (SPEC 5 "aggregated over tokens").
--
--   count C_j(l) = #{t : a[l,t,j] > 0}     mass M_j(l) = sum_t a[l,t,j]
--   p_j(l) = M_j(l) / sum_l' M_j(l')
-- Only (latent, layer) pairs with count > 0 appear (p = 0 elsewhere).
-- depends: latents, sae_layers
-- Parameters: none.
-- Columns: sae_id, latent, layer (model block), layer_idx (0..L-1, see sae_layers),
--          count, mass, p.
CREATE OR REPLACE VIEW latent_layers AS
WITH per_layer AS (
    SELECT hash(sae_id) AS sae_key, latent, layer,
           count(*) AS count, sum(value::DOUBLE) AS mass
    FROM latents
    GROUP BY ALL
)
SELECT s.sae_id, p.latent, p.layer, s.layer_idx, p.count, p.mass,
       p.mass / sum(p.mass) OVER (PARTITION BY p.sae_key, p.latent) AS p
FROM per_layer p
JOIN sae_layers s USING (sae_key, layer);
