-- metrics_vs_baselines: an MLSAE's per-layer metrics beside the single-layer SAEs trained
-- on one of its layers each (SPEC's finding 5: reconstruction and delta CE comparable).
-- One row per layer of the MLSAE; the baseline columns are NULL where no SAE of
-- `baselines` has metrics at that layer.
-- depends: layer_metrics
-- Parameters: mlsae (sae_id), baselines (a list of sae_ids, e.g. ['a', 'b']).
-- Usage: SELECT * FROM metrics_vs_baselines('my-mlsae', ['sae-L0', 'sae-L1']);
--        mean over the layers with a baseline:
--        SELECT avg(fvu), avg(fvu_sae) FROM metrics_vs_baselines(...) WHERE fvu_sae IS NOT NULL;
-- Columns: layer, baseline_id, fvu, fvu_sae, delta_ce, delta_ce_sae, kl, kl_sae,
--          dead_fraction, dead_fraction_sae, l0, l0_sae.
CREATE OR REPLACE MACRO metrics_vs_baselines(mlsae, baselines) AS TABLE
SELECT m.layer, b.sae_id AS baseline_id,
       m.fvu, b.fvu AS fvu_sae, m.delta_ce, b.delta_ce AS delta_ce_sae,
       m.kl, b.kl AS kl_sae, m.dead_fraction, b.dead_fraction AS dead_fraction_sae,
       m.l0, b.l0 AS l0_sae
FROM (SELECT * FROM layer_metrics WHERE sae_id = mlsae) m
LEFT JOIN (SELECT * FROM layer_metrics WHERE list_contains(baselines, sae_id)) b
       USING (layer)
ORDER BY m.layer;
