"""The explorer app: the JSON API (api.py) and the page (static/), and `serve()`, which runs
it with uvicorn. The page is three views of one HTML file: / (the SAEs), /prompt?sae=&text=
(a prompt; the URL holds it, so it can be shared) and /latent?sae=&latent=."""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from mlsae.serve.api import Explorer, add_error_handlers, router
from mlsae.serve.catalog import Catalog
from mlsae.serve.loaded import Loader

STATIC_DIR = Path(__file__).resolve().parent / "static"
PAGES = ("/", "/prompt", "/latent")
# The page loads only its own files: no inline script, nothing from elsewhere.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
                               "frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

log = logging.getLogger("mlsae.serve")


def create_app(warehouse_dir: str | Path, device: str = "auto") -> FastAPI:
    """The explorer over `warehouse_dir` (opened read-only; WarehouseError if it is not one).
    A URL (s3://bucket/prefix) is queried through a local mirror of its committed tables,
    and an SAE's weights are pulled into this machine's working copy on first use."""
    catalog = Catalog(warehouse_dir)
    explorer = Explorer(catalog, Loader(catalog.where, device))
    app = FastAPI(title="mlsae explorer", version="1",
                  description="Read-only explorer of an mlsae warehouse (docs/serve.md).",
                  docs_url=None, redoc_url=None)  # their pages load scripts from a CDN
    app.state.explorer = explorer
    app.include_router(router(explorer))
    add_error_handlers(app)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    for path in PAGES:
        app.add_api_route(path, page, methods=["GET"], include_in_schema=False)

    @app.middleware("http")
    async def security_headers(request, call_next):
        response = await call_next(request)
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    return app


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exposure_warning(host: str) -> str | None:
    """The warning to print when the explorer listens beyond this machine."""
    if is_loopback(host):
        return None
    return (f"the explorer listens on {host}: anyone who can reach this address can read "
            "the warehouse's tables and run the models (there is no login). Use the default "
            "--host 127.0.0.1 (and an SSH tunnel) unless that is what you want.")


def serve(warehouse_dir: str | Path, host: str = "127.0.0.1", port: int = 8000,
          device: str = "auto") -> None:
    """Run the explorer with uvicorn until interrupted."""
    import uvicorn

    app = create_app(warehouse_dir, device)
    uvicorn.run(app, host=host, port=port, log_level="warning")
