"""The explorer's JSON API (all under /api/, all read-only):

    GET  /api/saes                      every SAE: its saes row, per-layer metrics, variance
                                        summary (each panel with its SQL)
    POST /api/prompt                    {sae_id, text, layer?, steer?: {latent, layer, factor}}
                                        -> tokens, activations, heatmap, top latents, logits
    GET  /api/latent/{sae_id}/{latent}  stats, layer distribution, top contexts (with SQL),
                                        nearest latents, promoted tokens
    GET  /api/limits                    the input limits

Errors are JSON {"detail": message}: 404 for an unknown sae_id or an out-of-range latent,
422 for input outside the limits, 500 (message only, never a traceback) otherwise.
"""

from __future__ import annotations

import math
import threading
from typing import Any

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from mlsae.serve import decoder
from mlsae.serve import prompt as pr
from mlsae.serve.catalog import Catalog, NotFound
from mlsae.serve.loaded import Loader


class SteerRequest(BaseModel):
    latent: int = Field(description="Latent whose decoder direction is added.")
    layer: int = Field(description="Model block at whose output it is added (an SAE layer).")
    factor: float = Field(description=f"Multiple of the direction, |factor| <= "
                                      f"{pr.MAX_STEER_FACTOR:g}; 0 = the clean run.")


class PromptRequest(BaseModel):
    sae_id: str = Field(max_length=200)
    text: str = Field(description=f"The prompt (at most {pr.MAX_PROMPT_CHARS} characters "
                                  f"and {pr.MAX_PROMPT_TOKENS} tokens).")
    layer: int | None = Field(default=None, description="Block replaced by its reconstruction "
                                                         "(default: the SAE's middle layer).")
    steer: SteerRequest | None = None


class Explorer:
    """The warehouse catalog, the loaded SAEs and one lock around model work."""

    def __init__(self, catalog: Catalog, loader: Loader):
        self.catalog, self.loader = catalog, loader
        self._heatmaps: dict[str, pr.PromptHeatmap] = {}
        self._compute = threading.Lock()

    def prompt(self, request: PromptRequest) -> dict[str, Any]:
        record = self.catalog.sae(request.sae_id)
        steer = None
        if request.steer is not None:
            s = request.steer
            if not math.isfinite(s.factor):
                raise pr.BadInput("steering factor must be a finite number")
            steer = pr.Steer(s.latent, s.layer, s.factor)
        with self._compute:
            handle = self.loader.get(record)
            if request.sae_id not in self._heatmaps:
                self._heatmaps[request.sae_id] = pr.PromptHeatmap(
                    request.sae_id, self.catalog.sae_table(request.sae_id))
            return pr.analyse(handle, self._heatmaps[request.sae_id], request.text,
                              request.layer, steer)

    def latent(self, sae_id: str, latent: int) -> dict[str, Any]:
        record = self.catalog.check_latent(sae_id, latent)
        out: dict[str, Any] = {"sae_id": sae_id, "latent": latent, "layers": record["layers"],
                               "n_latents": record["n_latents"],
                               **self.catalog.latent(sae_id, latent)}
        try:
            with self._compute:
                handle = self.loader.get(record)
                out["nearest"] = decoder.nearest_latents(handle.sae, latent)
                out["tokens"] = decoder.promoted_tokens(handle.sae, handle.loaded, latent)
            out["weights_note"] = None
        except NotFound as e:  # tables without weights: the warehouse panels still show
            out.update(nearest=[], tokens={"promoted": [], "suppressed": []},
                       weights_note=str(e))
        return out


def router(explorer: Explorer) -> APIRouter:
    api = APIRouter(prefix="/api")

    @api.get("/saes")
    def saes() -> list[dict[str, Any]]:
        return explorer.catalog.home()

    @api.post("/prompt")
    def prompt(request: PromptRequest) -> dict[str, Any]:
        return explorer.prompt(request)

    @api.get("/latent/{sae_id}/{latent}")
    def latent(sae_id: str, latent: int) -> dict[str, Any]:
        return explorer.latent(sae_id, latent)

    @api.get("/limits")
    def limits() -> dict[str, Any]:
        return {"max_prompt_chars": pr.MAX_PROMPT_CHARS, "max_prompt_tokens":
                pr.MAX_PROMPT_TOKENS, "max_steer_factor": pr.MAX_STEER_FACTOR}

    return api


def _message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "path"))
        parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
    return "; ".join(parts) or "invalid request"


def add_error_handlers(app) -> None:
    """Errors as {"detail": message}: no traceback ever reaches the client."""

    @app.exception_handler(NotFound)
    async def not_found(_request: Request, exc: NotFound) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(pr.BadInput)
    async def bad_input(_request: Request, exc: pr.BadInput) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _message(exc)}, status_code=422)

    @app.exception_handler(Exception)
    async def internal(_request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": f"internal error ({type(exc).__name__}): {exc}"},
                            status_code=500)
