"""The contract as OpenAPI 3.1: it covers every route, the worker's answers match it
(schemathesis against a live worker), and /docs renders it from files the worker
serves itself."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from llmworker.api import create_app
from llmworker.openapi import document

from .conftest import free_port, llmworker_command, process, worker_env
from .conftest import serve_api as api
from .test_processes import wait_ready

KEY = "schema-key-0123456789abcdef"
# Served for people, not part of the API: the dashboard, the docs and the document.
PAGES = {"/", "/static/{name}", "/docs", "/docs/assets/{name}", "/openapi.json"}


def test_the_document_is_openapi_3_1_and_describes_every_route(make_settings):
    settings = make_settings(API_KEYS=f"tenant-xyz:{KEY}", ADMIN_KEYS="admin-0123456789abcdef")
    app = create_app(settings)
    doc = document(settings)
    assert doc["openapi"] == "3.1.0"
    routes: dict[str, set[str]] = {}
    for route in app.routes:
        methods = {m.lower() for m in getattr(route, "methods", ()) if m != "HEAD"}
        # A converter ({user:path}: a user id may hold '/') is the router's business.
        path = re.sub(r":\w+}", "}", route.path)  # type: ignore[attr-defined]
        routes.setdefault(path, set()).update(methods)
    described = {path: set(ops) - {"parameters"} for path, ops in doc["paths"].items()}
    assert {p: m for p, m in routes.items() if p not in PAGES} == described
    # The tenants an admin may name, the kinds, and every error code are spelled out.
    # The document is public: it names no tenant.
    tenant = doc["paths"]["/v1/tasks/{id}"]["parameters"][1]
    assert "enum" not in tenant["schema"] and "tenant-xyz" not in json.dumps(doc)
    schemas = doc["components"]["schemas"]
    assert "chat" in schemas["TaskSpec"]["properties"]["kind"]["examples"]
    codes = schemas["ErrorAnswer"]["properties"]["error"]["examples"]
    assert {"queue_full", "invalid_field", "not_finished", "signature_replayed"} <= set(codes)
    assert doc["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    events = doc["paths"]["/v1/tasks/{id}/events"]["get"]
    assert set(events["x-events"]) == {"status", "tokens", "reasoning", "progress", "record"}
    assert "text/event-stream" in events["responses"]["200"]["content"]


def test_schemathesis_finds_no_server_error_and_every_answer_matches_the_schema(
    redis_url: str, prefix: str, tmp_path: Path
):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    # The QStash edge is tested as deployments use it: configured.
    env = worker_env(
        redis_url,
        prefix,
        FAKE_LATENCY_MS="20",
        API_KEYS=KEY,
        QSTASH_CURRENT_SIGNING_KEY="sig_current_0123456789",
        QSTASH_NEXT_SIGNING_KEY="sig_next_0123456789",
        PUBLIC_URL=base,
    )
    with process(llmworker_command("serve", "--port", str(port)), env, tmp_path / "serve.log"):
        wait_ready(base)
        checks = (
            "not_a_server_error,status_code_conformance,content_type_conformance,"
            "response_headers_conformance,response_schema_conformance"
        )
        run = subprocess.run(
            [
                str(Path(sys.executable).parent / "schemathesis"),
                "run",
                f"{base}/openapi.json",
                "--header",
                f"Authorization: Bearer {KEY}",
                "--max-examples",
                "40",
                "--seed",
                "1",
                "--checks",
                checks,
                "--request-timeout",
                "10",
                "--no-color",
                "--report",
                "ndjson",
                "--report-dir",
                str(tmp_path / "report"),
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        serve_log = (tmp_path / "serve.log").read_text()
    assert run.returncode == 0, run.stdout[-6000:] + serve_log[-2000:]
    counted = re.search(r"(\d+) generated, (\d+) passed", run.stdout)
    assert counted is not None, run.stdout[-2000:]
    generated, passed = int(counted.group(1)), int(counted.group(2))
    assert generated >= 500 and passed == generated, run.stdout[-2000:]
    assert "Traceback" not in serve_log


async def test_docs_render_the_document_from_files_the_worker_serves(make_settings):
    async with api(make_settings(), dispatch=False) as (client, _):
        page = await client.get("/docs")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
        assert assets and all(a.startswith("/") and not a.startswith("//") for a in assets)
        for asset in assets:
            r = await client.get(asset)
            assert r.status_code == 200 and r.content, asset
        bundle = await client.get("/docs/assets/swagger-ui-bundle.js")
        # Swagger UI renders OpenAPI 3.1 from version 5 on.
        versions = {int(v) for v in re.findall(r"swagger-ui@(\d+)\.", bundle.text)} or {5}
        assert min(versions) >= 5
        script = (await client.get("/static/docs.js")).text
        assert '"/openapi.json"' in script
        doc = await client.get("/openapi.json")
        assert json.loads(doc.content)["openapi"] == "3.1.0"
        # Only the files of the two folders are served: no path reaches anything else.
        for path in ("/static/..%2Fapi.py", "/docs/assets/..%2F..%2F__init__.py", "/static/x"):
            assert (await client.get(path)).status_code == 404, path
        assert (await client.get("/docs/assets/swagger-ui.css")).headers["cache-control"]


async def test_the_documented_example_submission_is_admitted(make_settings):
    settings = make_settings(FAKE_LATENCY_MS=10)
    body = document(settings)["paths"]["/v1/tasks"]["post"]["requestBody"]
    example = body["content"]["application/json"]["example"]
    async with api(settings, dispatch=False) as (client, _):
        assert (await client.post("/v1/tasks", json=example)).status_code == 202
