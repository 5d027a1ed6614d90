"""The TypeScript client (clients/typescript): its tests, run by node's test runner
against a real ``llmworker serve``, and its types, which must match the worker's OpenAPI
document as generated (``npm run generate``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .conftest import CALLBACK_SECRET, ROOT, free_port, installed, llmworker_command, process
from .test_processes import qstash_dev, wait_ready

CLIENT = ROOT / "clients" / "typescript"


def _npm(*args: str, timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
    npm = installed("npm", "npm")
    if not (CLIENT / "node_modules").is_dir():
        # `make test` installs them (npm ci); a bare pytest run does it here.
        subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=CLIENT, check=True, timeout=600)
    return subprocess.run(
        [npm, *args], cwd=CLIENT, capture_output=True, text=True, timeout=timeout_s
    )


def test_the_typescript_client_passes_its_tests_against_a_live_worker(
    redis_url: str, prefix: str, tmp_path: Path
):
    installed("node", "nodejs")
    built = _npm("run", "build")
    assert built.returncode == 0, built.stdout + built.stderr
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    keys = {
        "QSTASH_CURRENT_SIGNING_KEY": "sig_ts_" + "c" * 20,
        "QSTASH_NEXT_SIGNING_KEY": "sig_ts_" + "n" * 20,
    }
    env = {
        "REDIS_URL": redis_url,
        "REDIS_PREFIX": prefix,
        "LOG_LEVEL": "WARNING",
        "FAKE_LATENCY_MS": "600",
        "FAKE_TOKENS": "40",
        "MAX_USER_FREE": "1",
        "CALLBACK_SECRET": CALLBACK_SECRET,
        "CALLBACK_ALLOWED_HOSTS": "127.0.0.1",
        "PUBLIC_URL": url,
        **keys,
    }
    # QStash, played by qstash-dev: publish() goes through it to /v1/qstash.
    with (
        qstash_dev("ts-token", keys, tmp_path / "qstash-dev.log") as dev_url,
        process(llmworker_command("serve", "--port", str(port)), env, tmp_path / "serve.log"),
    ):
        wait_ready(url)
        run = subprocess.run(
            ["node", "--test", "--test-reporter=tap", "test/"],
            cwd=CLIENT,
            env={
                **os.environ,
                "LLMWORKER_URL": url,
                "CALLBACK_SECRET": CALLBACK_SECRET,
                "QSTASH_URL": dev_url,
                "QSTASH_TOKEN": "ts-token",
            },
            capture_output=True,
            text=True,
            timeout=240,
        )
    log = (tmp_path / "serve.log").read_text()
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:] + log[-2000:]
    # Every test ran and passed (a test file that fails to load counts no test).
    assert "# fail 0" in run.stdout and "# pass 10" in run.stdout, run.stdout[-3000:]
    assert "Traceback" not in log


def test_the_typescript_types_match_the_workers_openapi_document(tmp_path: Path):
    installed("node", "nodejs")
    document = subprocess.run(
        [sys.executable, "-m", "llmworker.openapi"], capture_output=True, text=True, check=True
    ).stdout
    (tmp_path / "openapi.json").write_text(document)
    generated = tmp_path / "schema.ts"
    made = _npm(
        "exec", "--", "openapi-typescript", str(tmp_path / "openapi.json"), "-o", str(generated)
    )
    assert made.returncode == 0, made.stdout + made.stderr
    checked_in = (CLIENT / "src" / "schema.ts").read_text()
    assert generated.read_text() == checked_in, (
        "clients/typescript/src/schema.ts differs from the worker's OpenAPI document: "
        "run `npm run generate` in clients/typescript and check the client still builds"
    )
