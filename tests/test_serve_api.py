"""`mlsae serve`'s JSON API on a warehouse made by the pipeline's steps on the embedded model
(tests/serve_warehouse.py): the prompt endpoint against the library's encoder and the
evaluation's splice, the latent endpoint against the views, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mlsae import warehouse as wh
from tests.serve_warehouse import LENS_SAE_ID, SAE_ID, build_serve_warehouse

PROMPT = "When John and Mary went to the store, John gave a drink to"


@pytest.fixture(scope="module")
def warehouse(tmp_path_factory):
    return build_serve_warehouse(tmp_path_factory)


@pytest.fixture(scope="module")
def client(warehouse):
    from fastapi.testclient import TestClient

    from mlsae.serve.app import create_app

    with TestClient(create_app(warehouse, device="cpu"), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture(scope="module", params=[SAE_ID, LENS_SAE_ID])
def sae_id(request):
    """Each test that takes it runs on the plain SAE and on the one in a tuned-lens basis."""
    return request.param


@pytest.fixture(scope="module")
def handle(client, sae_id):
    """The explorer's own loaded SAE + model (loaded once, shared with the tests)."""
    explorer = client.app.state.explorer
    return explorer.loader.get(explorer.catalog.sae(sae_id))


@pytest.fixture(scope="module")
def prompt_reply(client, sae_id):
    r = client.post("/api/prompt", json={"sae_id": sae_id, "text": PROMPT, "layer": 2,
                                         "steer": {"latent": 3, "layer": 1, "factor": 0.0}})
    assert r.status_code == 200, r.text
    return r.json()


def _query(warehouse, sql, params=None):
    con = wh.connect(warehouse)
    try:
        return wh.query_dicts(con, sql, params)
    finally:
        con.close()


def test_saes_lists_every_sae_with_its_panels(client, warehouse):
    r = client.get("/api/saes")
    assert r.status_code == 200
    sae, lens_sae = r.json()
    assert sae["sae_id"] == SAE_ID and sae["layers"] == [0, 1, 2, 3, 4, 5]
    assert lens_sae["sae_id"] == LENS_SAE_ID and lens_sae["lens"] == "embedded"
    assert sae["lens"] is None
    metrics = _query(warehouse, "SELECT * FROM layer_metrics WHERE sae_id = ? ORDER BY layer",
                     [SAE_ID])
    assert [m["fvu"] for m in sae["layer_metrics"]["rows"]] == [m["fvu"] for m in metrics]
    summary = _query(warehouse, "SELECT * FROM variance_summary WHERE sae_id = ?", [SAE_ID])[0]
    assert sae["variance_summary"]["rows"][0]["ratio_token"] == pytest.approx(
        summary["ratio_token"], rel=1e-12)


def test_prompt_activations_equal_the_encoder(prompt_reply, handle):
    from mlsae.hooks import capture_residuals

    tokenizer = handle.loaded.tokenizer
    ids = tokenizer(PROMPT)["input_ids"]
    assert [t["id"] for t in prompt_reply["tokens"]] == ids
    with torch.no_grad():
        x_TLD = capture_residuals(handle.loaded.model, torch.tensor([ids]), handle.layers)[0]
        T, L, D = x_TLD.shape
        x_ND = x_TLD.reshape(T * L, D)
        if handle.basis is not None:
            x_ND = handle.basis.to_sae(x_ND, torch.tensor(handle.layers).repeat(T))
        out = handle.sae.encode(x_ND)
    assert (handle.basis is None) == (prompt_reply["sae_id"] == SAE_ID)
    acts = out.top_acts_NK.reshape(T, L, -1).numpy()
    idx = out.top_idx_NK.reshape(T, L, -1).numpy()
    for t in range(T):
        for li in range(L):
            expected = {int(j): float(a) for j, a in zip(idx[t, li], acts[t, li], strict=True)
                        if a > 0}
            got = dict((int(j), a) for j, a in prompt_reply["activations"][t][li])
            assert got.keys() == expected.keys()
            for j, a in expected.items():
                assert got[j] == pytest.approx(a, rel=1e-6, abs=1e-7)


def test_prompt_heatmap_is_spec_fig3(prompt_reply):
    """p_sj(l) = m_sj(l) / m_sj over the prompt's tokens, latents with max < 1e-3 left out."""
    L = len(prompt_reply["layers"])
    mass: dict[int, np.ndarray] = {}
    peak: dict[int, float] = {}
    for per_layer in prompt_reply["activations"]:
        for li, pairs in enumerate(per_layer):
            for j, a in pairs:
                mass.setdefault(j, np.zeros(L))[li] += a
                peak[j] = max(peak.get(j, 0.0), a)
    kept = {j for j, m in peak.items() if m >= 1e-3}
    rows = prompt_reply["heatmap"]["rows"]
    assert {r["latent"] for r in rows} == kept
    assert len(rows) == len(kept) * L
    for r in rows:
        assert r["p"] == pytest.approx(mass[r["latent"]][r["layer_idx"]]
                                       / mass[r["latent"]].sum(), abs=1e-6)
    expected = [r["expected_layer"] for r in sorted(rows, key=lambda r: r["rank"])]
    assert expected == sorted(expected)


def test_steering_factor_zero_gives_the_clean_logits(prompt_reply, client, sae_id):
    logits = prompt_reply["logits"]
    assert logits["steered"] == logits["clean"]
    assert logits["steered_cost"]["delta_ce"] == 0.0 and logits["steered_cost"]["kl"] == 0.0
    r = client.post("/api/prompt", json={"sae_id": sae_id, "text": PROMPT,
                                         "steer": {"latent": 3, "layer": 1, "factor": 50.0}})
    assert r.status_code == 200
    assert r.json()["logits"]["steered"] != r.json()["logits"]["clean"]
    assert r.json()["logits"]["steered_cost"]["kl"] > 0


def test_reconstruction_logits_equal_the_evaluation_splice(prompt_reply, handle):
    """The evaluation (mlsae.sae.evaluate) splices reconstruct(...) into the unmasked tokens
    of block l; the prompt endpoint's reconstructed logits and delta CE / KL are that."""
    from mlsae.data import special_token_mask
    from mlsae.hooks import splice_forward
    from mlsae.sae.evaluate import next_token_ce_kl, reconstruct

    model, tokenizer = handle.loaded.model, handle.loaded.tokenizer
    ids = torch.tensor([tokenizer(PROMPT)["input_ids"]])
    mask = torch.as_tensor(special_token_mask(ids.numpy(), tokenizer))
    layer = prompt_reply["logits"]["layer"]
    assert layer == 2

    def replace(h_BTD):
        x_hat, _, _ = reconstruct(handle.sae, h_BTD[mask].float(), layer, handle.basis)
        out = h_BTD.clone()
        out[mask] = x_hat.to(h_BTD.dtype)
        return out

    with torch.no_grad():
        clean = model(input_ids=ids).logits
        spliced = splice_forward(model, ids, layer, replace)
    for t, preds in enumerate(prompt_reply["logits"]["reconstructed"]):
        top = spliced[0, t].topk(len(preds))
        assert [p["id"] for p in preds] == top.indices.tolist()
        assert [p["logit"] for p in preds] == pytest.approx(top.values.tolist(), rel=1e-5)
    sums = next_token_ce_kl(clean, spliced, ids, mask)
    cost = prompt_reply["logits"]["reconstructed_cost"]
    assert cost["delta_ce"] == pytest.approx((sums.ce_spliced - sums.ce_clean) / sums.count,
                                             rel=1e-6)
    assert cost["kl"] == pytest.approx(sums.kl / sums.count, rel=1e-6)
    assert spliced.sub(clean).abs().max() > 0  # the splice changed something


@pytest.fixture(scope="module")
def busiest_latent(warehouse, sae_id):
    return _query(warehouse, "SELECT latent FROM latent_stats WHERE sae_id = ? ORDER BY count "
                             "DESC, latent LIMIT 1", [sae_id])[0]["latent"]


def test_latent_numbers_equal_the_views(client, warehouse, busiest_latent, handle, sae_id):
    j = busiest_latent
    r = client.get(f"/api/latent/{sae_id}/{j}")
    assert r.status_code == 200, r.text
    data = r.json()
    stats = _query(warehouse, "SELECT * FROM latent_stats WHERE sae_id = ? AND latent = ?",
                   [sae_id, j])[0]
    got = data["stats"]["rows"][0]
    for key in ("count", "mass", "expected_layer", "layer_std", "token_var", "prompt_var"):
        assert got[key] == pytest.approx(stats[key], rel=1e-12), key
    layers = _query(warehouse, "SELECT layer, p FROM latent_layers WHERE sae_id = ? AND "
                               "latent = ?", [sae_id, j])
    dist = {row["layer"]: row["p"] for row in data["distribution"]["rows"]}
    assert dist == pytest.approx({**dict.fromkeys(range(6), 0.0),
                                  **{row["layer"]: row["p"] for row in layers}}, rel=1e-12)
    top = _query(warehouse, "SELECT layer, value, context FROM top_contexts(n := 5) "
                            "WHERE sae_id = ? AND latent = ?", [sae_id, j])
    assert sorted((c["layer"], c["value"]) for c in data["contexts"]["rows"]) == sorted(
        (c["layer"], c["value"]) for c in top)
    for c in data["contexts"]["rows"]:
        assert c["tokens"][c["positions"].index(c["pos"])] == c["token"]
    # decoder panels from the SAE's weights
    W = handle.sae.W_dec_MD.detach()
    cos = torch.nn.functional.cosine_similarity(W, W[j][None], dim=1)
    cos[j] = -2
    assert [n["latent"] for n in data["nearest"]] == cos.topk(10).indices.tolist()
    unembed = handle.loaded.model.get_output_embeddings().weight.detach() @ W[j]
    assert [t["id"] for t in data["tokens"]["promoted"]] == unembed.topk(10).indices.tolist()


def test_every_panel_sql_runs_with_mlsae_sql(client, warehouse, busiest_latent, sae_id):
    from click.testing import CliRunner

    from flows.cmd_sql import command as sql_command

    data = client.get(f"/api/latent/{sae_id}/{busiest_latent}").json()
    home = next(s for s in client.get("/api/saes").json() if s["sae_id"] == sae_id)
    for panel in (data["stats"], data["distribution"], data["contexts"],
                  home["layer_metrics"], home["variance_summary"]):
        result = CliRunner().invoke(sql_command, ["--out", str(warehouse), "--format", "json",
                                                  panel["sql"]])
        assert result.exit_code == 0, result.output
        import json

        rows = json.loads(result.output)
        assert len(rows) == len(panel["rows"])
        assert rows[0].keys() == panel["rows"][0].keys()


def test_a_dead_latent_is_an_empty_page_not_an_error(client, warehouse):
    dead = _query(warehouse, "SELECT latent FROM dead_latents() WHERE sae_id = ? LIMIT 1",
                  [SAE_ID])
    if not dead:
        pytest.skip("every latent fired")
    r = client.get(f"/api/latent/{SAE_ID}/{dead[0]['latent']}")
    assert r.status_code == 200
    assert r.json()["stats"]["rows"] == [] and r.json()["contexts"]["rows"] == []


@pytest.mark.parametrize(("method", "path", "body", "status", "message"), [
    ("post", "/api/prompt", {"sae_id": SAE_ID, "text": ""}, 422, "empty"),
    ("post", "/api/prompt", {"sae_id": SAE_ID, "text": "   \n"}, 422, "empty"),
    ("post", "/api/prompt", {"sae_id": SAE_ID, "text": "x" * 4001}, 422, "limit is 4000"),
    ("post", "/api/prompt", {"sae_id": SAE_ID, "text": "<|endoftext|>"}, 422, "special tokens"),
    ("post", "/api/prompt", {"sae_id": SAE_ID, "text": "the " * 300}, 422, "limit is 256"),
    ("post", "/api/prompt", {"sae_id": "no-such-sae", "text": "hi"}, 404, "unknown sae_id"),
    ("post", "/api/prompt", {"sae_id": SAE_ID, "text": "hi", "layer": 9}, 422, "not one of"),
    ("post", "/api/prompt", {"sae_id": SAE_ID, "text": "hi",
                             "steer": {"latent": 1, "layer": 1, "factor": 1e12}}, 422,
     "factor"),
    ("post", "/api/prompt", {"sae_id": SAE_ID, "text": "hi",
                             "steer": {"latent": 4096, "layer": 1, "factor": 1}}, 422,
     "out of range"),
    ("post", "/api/prompt", {"text": "hi"}, 422, "sae_id"),
    ("get", f"/api/latent/{SAE_ID}/1024", None, 404, "out of range"),
    ("get", f"/api/latent/{SAE_ID}/-1", None, 404, "out of range"),
    ("get", f"/api/latent/{SAE_ID}/99999999999999999999999", None, 404, "out of range"),
    ("get", f"/api/latent/{SAE_ID}/abc", None, 422, "integer"),
    ("get", "/api/latent/no-such-sae/0", None, 404, "unknown sae_id"),
])
def test_bad_input_is_a_clear_error(client, method, path, body, status, message):
    r = client.request(method.upper(), path, json=body)
    assert r.status_code == status, r.text
    assert message in r.json()["detail"]
    assert "Traceback" not in r.text


def test_non_finite_steering_factor_is_refused(client):
    body = '{"sae_id": "SAE", "text": "hi", "steer": {"latent": 1, "layer": 1, "factor": NaN}}'
    r = client.post("/api/prompt", content=body.replace("SAE", SAE_ID),
                    headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and "Traceback" not in r.text


INJECTIONS = ["x' OR '1'='1", "'; DROP VIEW saes; --", "<script>alert(1)</script>",
              "$sae", "../../etc/passwd", "'); COPY saes TO '/tmp/x.csv'; --"]


@pytest.mark.parametrize("attack", INJECTIONS)
def test_injection_attempts_are_harmless(client, warehouse, attack):
    import urllib.parse

    before = _query(warehouse, "SELECT count(*) AS n FROM latents")[0]["n"]
    assert client.post("/api/prompt", json={"sae_id": attack, "text": "hi"}).status_code == 404
    r = client.get(f"/api/latent/{urllib.parse.quote(attack, safe='')}/0")
    assert r.status_code == 404, r.text
    r = client.post("/api/prompt", json={"sae_id": SAE_ID, "text": attack})
    assert r.status_code == 200
    assert "".join(t["text"] for t in r.json()["tokens"]) == attack  # text, never code
    assert [s["sae_id"] for s in client.get("/api/saes").json()] == [SAE_ID, LENS_SAE_ID]
    assert _query(warehouse, "SELECT count(*) AS n FROM latents")[0]["n"] == before


def test_pages_and_security_headers(client):
    for path in ("/", "/prompt?sae=x&text=y", "/latent?sae=x&latent=1"):
        r = client.get(path)
        assert r.status_code == 200 and "explorer.js" in r.text
        assert "default-src 'self'" in r.headers["content-security-policy"]
    assert client.get("/static/explorer.js").status_code == 200
    assert client.get("/docs").status_code == 404  # Swagger's page would load a CDN


def test_only_loopback_is_quiet():
    from mlsae.serve.app import exposure_warning

    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.5"):
        assert exposure_warning(host) is None
    for host in ("0.0.0.0", "192.168.1.4", "::", "example.org"):
        assert "no login" in exposure_warning(host)


def test_cli_refuses_a_directory_that_is_not_a_warehouse(tmp_path):
    from click.testing import CliRunner

    from flows.cli import main

    result = CliRunner().invoke(main, ["serve", "--out", str(tmp_path)])
    assert result.exit_code != 0
    assert "not an mlsae warehouse" in result.output


def test_cli_says_when_the_port_is_taken(warehouse):
    import socket

    from click.testing import CliRunner

    from flows.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(main, ["serve", "--out", str(warehouse), "--port", str(port)])
    assert result.exit_code != 0
    assert f"cannot listen on 127.0.0.1:{port}" in result.output
    assert "pick another --port" in result.output


def test_special_tokens_are_shown_but_never_analysed(client):
    r = client.post("/api/prompt", json={"sae_id": SAE_ID, "text": "<|endoftext|>Hello there"})
    assert r.status_code == 200, r.text
    data = r.json()
    assert [t["counted"] for t in data["tokens"]][0] is False
    assert all(pairs == [] for pairs in data["activations"][0])
    assert data["top_latents"][0] == []
    assert all(row["latent"] >= 0 for row in data["heatmap"]["rows"])
    assert data["logits"]["reconstructed_cost"]["positions"] == len(data["tokens"]) - 2
