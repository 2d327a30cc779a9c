-- latent_contexts: the top-n activating contexts of ONE latent of one SAE, per layer,
-- each with a window of surrounding logged tokens as a list (for highlighting) and as
-- text with the active token marked [[like this]]. The explorer's latent page
-- (`mlsae serve`) shows it; top_contexts is the same for every latent at once (a whole
-- GROUP BY over latents), this one reads only the latent's rows.
-- Ties in value are broken by (seq_id, pos). Masked (special) tokens are not logged and
-- so never appear in a context.
-- depends: latents, tokens
-- Parameters: sae (sae_id), j (latent), n := 5 (contexts per layer), width := 8 (tokens
--             each side).
-- Usage: SELECT * FROM latent_contexts('my-sae', 123, n := 3);
-- Columns: sae_id, latent, layer (model block), rank (1 = highest), value, seq_id, pos,
--          token (the active token), tokens (list of the window's token texts),
--          positions (their pos), context.
CREATE OR REPLACE MACRO latent_contexts(sae, j, n := 5, width := 8) AS TABLE
WITH hits AS (
    SELECT layer, seq_id, pos, value,
           row_number() OVER (PARTITION BY layer ORDER BY value DESC, seq_id, pos) AS rank
    FROM latents
    WHERE sae_id = sae AND latent = j
    QUALIFY rank <= n
)
SELECT sae AS sae_id, j AS latent, h.layer, h.rank, h.value, h.seq_id, h.pos,
       max(t.token) FILTER (WHERE t.pos = h.pos) AS token,
       list(t.token ORDER BY t.pos) AS tokens,
       list(t.pos ORDER BY t.pos) AS positions,
       string_agg(CASE WHEN t.pos = h.pos THEN '[[' || t.token || ']]' ELSE t.token END,
                  '' ORDER BY t.pos) AS context
FROM hits h
JOIN tokens t
  ON t.sae_id = sae AND t.seq_id = h.seq_id
 AND t.pos BETWEEN h.pos - width AND h.pos + width
GROUP BY h.layer, h.rank, h.value, h.seq_id, h.pos
ORDER BY h.layer, h.rank;
