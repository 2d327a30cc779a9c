-- sae_layers: the layer index of every model block an SAE reads (helper for the other views).
--
-- Every analysis uses the layer INDEX l = 0..L-1, the position of the block in
-- saes.layers, not the model's block number: for an SAE over all blocks the two are
-- equal; for layers = [2, 4, 6] block 4 has index 1. L = len(layers).
-- sae_key = hash(sae_id): the views group and join on it rather than on the string
-- (about 2x faster); mlsae.warehouse.connect checks that no two sae_ids share a hash.
-- depends: saes
-- Parameters: none.
-- Columns: sae_id, sae_key, layer (model block index, as in latents.layer),
--          layer_idx (0..L-1), n_layers (L).
CREATE OR REPLACE VIEW sae_layers AS
SELECT sae_id,
       hash(sae_id) AS sae_key,
       unnest(layers) AS layer,
       unnest(range(len(layers)))::SMALLINT AS layer_idx,
       len(layers) AS n_layers
FROM saes;
