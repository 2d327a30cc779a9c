-- sae_metric_means: per SAE, its evaluation metrics averaged over the layers it reads
-- (layer_metrics; the report's "every MLSAE of the grid, averaged over layers").
-- depends: layer_metrics
-- Parameters: none.
-- Columns: sae_id, n_layers (layers with metrics), fvu, mse, l0, dead_fraction,
--          delta_ce, kl.
CREATE OR REPLACE VIEW sae_metric_means AS
SELECT sae_id, count(*) AS n_layers, avg(fvu) AS fvu, avg(mse) AS mse, avg(l0) AS l0,
       avg(dead_fraction) AS dead_fraction, avg(delta_ce) AS delta_ce, avg(kl) AS kl
FROM layer_metrics
GROUP BY sae_id;
