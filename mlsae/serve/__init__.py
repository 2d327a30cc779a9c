"""`mlsae serve`: the explorer, a read-only web page and JSON API over a warehouse.

    catalog.py   the warehouse side: each panel's query (queries.py) run read-only
    queries.py   the panels' SQL (one statement each over the sql/ views and macros),
                 shown on the page as text `mlsae sql` runs
    loaded.py    each SAE's weights, model and basis, loaded once and reused
    prompt.py    a typed-in prompt: activations, Fig. 3 heatmap, logits (clean /
                 reconstructed / steered)
    decoder.py   a latent's decoder direction: nearest latents, promoted tokens
    api.py       the JSON API (/api/...), input limits, errors as JSON messages
    app.py       the FastAPI app (API + page) and `serve()` (uvicorn)
    static/      the page: plain HTML, CSS and JavaScript drawing SVG (no CDN, no build)

The library never imports Prefect; flows/cmd_serve.py is the command.
"""
