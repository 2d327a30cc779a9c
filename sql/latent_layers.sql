-- latent_layers: the distribution of each latent over layers, aggregated over all
-- logged tokens (SPEC 5 "aggregated over tokens").
--
--   count C_j(l) = #{t : a[l,t,j] > 0}     mass M_j(l) = sum_t a[l,t,j]
--   p_j(l) = M_j(l) / sum_l' M_j(l')
-- Only (latent, layer) pairs with count > 0 appear (p = 0 elsewhere).
-- The view reads the stored per-part sums (table latent_layer_sums, see part_sums.sql);
-- the macro takes any relation of such sums, e.g. of a subset of sequences:
--   WITH sub AS (FROM latents WHERE seq_id < 100), sums AS (FROM latent_layer_sums_of(sub))
--   FROM latent_layers_of(sums);
-- depends: latent_layer_sums, sae_layers, part_sums
-- Parameters: none (the macro: a relation with latent_layer_sums' columns, by name).
-- Columns: sae_id, latent, layer (model block), layer_idx (0..L-1, see sae_layers),
--          count, mass, p.
CREATE OR REPLACE MACRO latent_layers_of(layer_sums) AS TABLE
WITH per_layer AS (
    SELECT hash(sae_id) AS sae_key, latent, layer,
           sum(count)::BIGINT AS count, sum(mass) AS mass
    FROM query_table(layer_sums)
    GROUP BY ALL
)
SELECT s.sae_id, p.latent, p.layer, s.layer_idx, p.count, p.mass,
       p.mass / sum(p.mass) OVER (PARTITION BY p.sae_key, p.latent) AS p
FROM per_layer p
JOIN sae_layers s USING (sae_key, layer);

CREATE OR REPLACE VIEW latent_layers AS
SELECT * FROM latent_layers_of(latent_layer_sums);
