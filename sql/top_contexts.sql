-- top_contexts: the top-n activating contexts of every (latent, layer), with a window
-- of surrounding logged tokens; the active token is marked [[like this]].
-- Ties in value are broken arbitrarily. Masked (special) tokens are not logged and so
-- never appear in a context.
-- depends: latents, tokens
-- Parameters: n := 10 (contexts per latent and layer), width := 8 (tokens each side).
-- Usage: SELECT * FROM top_contexts(n := 5) WHERE latent = 123;
-- Columns: sae_id, latent, layer (model block), rank (1 = highest), value, seq_id, pos,
--          token (the active token), context.
CREATE OR REPLACE MACRO top_contexts(n := 10, width := 8) AS TABLE
WITH top AS (
    SELECT any_value(sae_id) AS sae_id, latent, layer,
           max_by({'seq_id': seq_id, 'pos': pos, 'value': value}, value, n) AS hits
    FROM latents
    GROUP BY hash(sae_id), latent, layer
),
hits AS (
    SELECT sae_id, latent, layer, unnest(hits) AS hit, generate_subscripts(hits, 1) AS rank
    FROM top
)
SELECT h.sae_id, h.latent, h.layer, h.rank, h.hit.value AS value,
       h.hit.seq_id AS seq_id, h.hit.pos AS pos,
       max(t.token) FILTER (WHERE t.pos = h.hit.pos) AS token,
       string_agg(CASE WHEN t.pos = h.hit.pos THEN '[[' || t.token || ']]' ELSE t.token END,
                  '' ORDER BY t.pos) AS context
FROM hits h
JOIN tokens t
  ON t.sae_id = h.sae_id AND t.seq_id = h.hit.seq_id
 AND t.pos BETWEEN h.hit.pos - width AND h.hit.pos + width
GROUP BY h.sae_id, h.latent, h.layer, h.rank, h.hit
ORDER BY h.sae_id, h.latent, h.layer, h.rank;
