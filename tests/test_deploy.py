"""The deployment kit (deploy/, Dockerfile, .github/): every file checked by the tool
that reads it, and a live test of the real Caddy in front of two replicas on loopback.
No Docker engine runs here, so the Docker files are checked statically."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from .conftest import ROOT, free_port, installed, llmworker_command, process
from .test_processes import wait_ready

BIN = Path(sys.executable).parent
DEPLOY = ROOT / "deploy"
COMPOSE_FILES = sorted(DEPLOY.glob("*/compose.yaml"))
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
CADDYFILES = [DEPLOY / "caddy" / "Caddyfile", DEPLOY / "caddy" / "Caddyfile.local"]
SHELL_SCRIPTS = [DEPLOY / "provision.sh", ROOT / ".ci" / "run"]


def caddy() -> str:
    """The caddy binary; CI installs it, so there its absence is a failure, not a skip."""
    return installed("caddy", "caddy")


def run(*args: str | Path, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=120, **kwargs
    )


def load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict)
    return data


def test_kit_files_exist():
    assert len(COMPOSE_FILES) == 4, COMPOSE_FILES  # app, caddy, dev, ops
    assert {w.name for w in WORKFLOWS} == {"ci.yml", "release.yml"}
    for path in [*CADDYFILES, *SHELL_SCRIPTS, ROOT / "Dockerfile", ROOT / ".dockerignore"]:
        assert path.is_file(), path


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.parent.name)
def test_compose_file_matches_the_compose_spec(path: Path):
    result = run(BIN / "check-jsonschema", "--builtin-schema", "vendor.compose-spec", path)
    assert result.returncode == 0, result.stdout + result.stderr
    # The top-level "version" is obsolete in the compose spec: none of the kit uses it.
    assert "version" not in load(path)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_matches_the_github_workflow_schema(path: Path):
    result = run(BIN / "check-jsonschema", "--builtin-schema", "vendor.github-workflows", path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_passes_hadolint_with_no_findings():
    result = run(BIN / "hadolint", "--failure-threshold", "style", ROOT / "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_is_multi_stage_non_root_with_a_health_check():
    lines = [line.strip() for line in (ROOT / "Dockerfile").read_text().splitlines()]
    instructions = [line for line in lines if line and not line.startswith("#")]
    assert sum(line.startswith("FROM ") for line in instructions) == 2
    assert any(line.startswith("COPY --from=builder /opt/venv") for line in instructions)
    user = [line for line in instructions if line.startswith("USER ")]
    assert user and user[-1] not in ("USER root", "USER 0", "USER 0:0")
    assert (
        'HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 CMD ["llmworker", "check"]'
        in instructions
    )
    assert "EXPOSE 8080" in instructions
    cmd = next(line for line in instructions if line.startswith("CMD "))
    assert json.loads(cmd.removeprefix("CMD ")) == ["llmworker", "serve"]  # exec form
    assert not any("SECRET" in line or "API_KEY" in line for line in instructions)


def test_app_compose_scales_behind_caddy_with_a_persistent_redis():
    app = load(DEPLOY / "app" / "compose.yaml")
    worker, redis = app["services"]["worker"], app["services"]["redis"]
    assert "ports" not in worker, "a fixed host port stops the second replica from starting"
    assert worker["deploy"]["replicas"] == "${WORKER_REPLICAS:-2}"
    assert worker["env_file"] == ".env.production"
    assert worker["environment"]["REDIS_URL"] == "redis://redis:6379/0"
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "web" in worker["networks"] and "internal" in worker["networks"]
    assert app["networks"]["web"] == {"external": True, "name": "web"}
    assert "--appendonly" in redis["command"] and "yes" in redis["command"]
    assert redis["volumes"] == ["redis-data:/data"] and "healthcheck" in redis
    assert redis["networks"] == ["internal"], "Redis stays off the network other tenants share"
    for service in (worker, redis):
        assert service["logging"] == {
            "driver": "json-file",
            "options": {"max-size": "10m", "max-file": "3"},
        }
    caddy_compose = load(DEPLOY / "caddy" / "compose.yaml")
    assert caddy_compose["networks"]["web"] == {"external": True, "name": "web"}
    ops = load(DEPLOY / "ops" / "compose.yaml")["services"]
    assert "--label-enable" in ops["watchtower"]["command"]
    assert ops["dozzle"]["environment"]["DOZZLE_AUTH_PROVIDER"] == "simple"
    assert not any("ports" in s for s in ops.values())


@pytest.mark.parametrize("path", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_shell_script_passes_shellcheck(path: Path):
    result = run(BIN / "shellcheck", path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_provision_is_idempotent(tmp_path: Path):
    script = DEPLOY / "provision.sh"
    first = run(script, "--root", tmp_path, "--only", "sysctl,layout")
    assert first.returncode == 0, first.stderr
    assert "wrote: /etc/sysctl.d/99-llmworker-bbr.conf" in first.stdout
    conf = tmp_path / "etc/sysctl.d/99-llmworker-bbr.conf"
    assert conf.read_text() == "net.core.default_qdisc=fq\nnet.ipv4.tcp_congestion_control=bbr\n"
    assert (tmp_path / "opt/caddy").is_dir() and (tmp_path / "opt/career-worker").is_dir()
    mtime = conf.stat().st_mtime_ns
    second = run(script, "--root", tmp_path, "--only", "sysctl,layout")
    assert second.returncode == 0
    assert "nothing to do" in second.stdout and "wrote:" not in second.stdout
    assert conf.stat().st_mtime_ns == mtime


def test_provision_dry_run_changes_nothing(tmp_path: Path):
    result = run(DEPLOY / "provision.sh", "--dry-run", "--root", tmp_path)
    assert result.returncode == 0, result.stderr
    for step in ("packages", "sysctl", "firewall", "docker", "layout", "network"):
        assert f"==> {step}:" in result.stdout
    assert "+ write /etc/sysctl.d/99-llmworker-bbr.conf" in result.stdout
    assert list(tmp_path.iterdir()) == []
    bad = run(DEPLOY / "provision.sh", "--frobnicate")
    assert bad.returncode == 2 and "unknown option" in bad.stderr


@pytest.mark.parametrize("path", CADDYFILES, ids=lambda p: p.name)
def test_caddy_reads_the_caddyfile(path: Path):
    result = run(caddy(), "adapt", "--config", path, "--adapter", "caddyfile")
    assert result.returncode == 0, result.stderr
    config = json.dumps(json.loads(result.stdout))
    assert "flush_interval" in config, "event streams must not be buffered"
    assert '"active": {' in config and '"uri": "/ready"' in config, "active checks on /ready"
    formatted = run(caddy(), "fmt", path)
    assert formatted.stdout == path.read_text(), "caddy fmt would change the file"


def test_caddy_balances_over_replicas_drops_a_stopped_one_and_streams_events(
    redis_url: str, prefix: str, tmp_path: Path
):
    binary = caddy()
    ports, listen = [free_port(), free_port()], free_port()
    env = {"REDIS_URL": redis_url, "REDIS_PREFIX": prefix, "LOG_LEVEL": "WARNING"}
    env |= {"FAKE_LATENCY_MS": "1500", "FAKE_TOKENS": "6", "SHUTDOWN_GRACE_S": "0"}
    caddy_env = {
        "LISTEN_PORT": str(listen),
        "UPSTREAMS": " ".join(f"127.0.0.1:{p}" for p in ports),
        "XDG_DATA_HOME": str(tmp_path / "data"),
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
    }
    proxy = f"http://127.0.0.1:{listen}"
    serve = [llmworker_command("serve", "--host", "127.0.0.1", "--port", str(p)) for p in ports]
    caddy_cmd = [binary, "run", "--config", str(CADDYFILES[1]), "--adapter", "caddyfile"]
    with (
        process(serve[0], env, tmp_path / "a.log"),
        process(serve[1], env, tmp_path / "b.log") as second,
        process(caddy_cmd, caddy_env, tmp_path / "caddy.log"),
    ):
        for port in ports:
            wait_ready(f"http://127.0.0.1:{port}")
        wait_ready(proxy)
        with httpx.Client(base_url=proxy, timeout=10) as client:
            # Round robin over the replicas Caddy's health checks call healthy; on a busy
            # machine a check may time out once, so look for a few seconds.
            seen: set[str] = set()
            deadline = time.monotonic() + 15
            while len(seen) < 2 and time.monotonic() < deadline:
                seen |= {client.get("/v1/stats").json()["replica"]["id"] for _ in range(10)}
                time.sleep(0.2)
            assert len(seen) == 2, "requests reach both replicas"
            # Whatever name the request uses, the worker answers (never Caddy's empty 200).
            for host in ("localhost", f"localhost:{listen}", "127.0.0.1", "dev.example"):
                health = client.get("/health", headers={"Host": host})
                assert health.status_code == 200 and health.json() == {"status": "ok"}

            # Event by event through Caddy: tokens arrive while the task still runs.
            body = {"kind": "chat", "input": {"messages": [{"role": "user", "content": "hi"}]}}
            task = client.post("/v1/tasks", json=body).json()
            arrivals: list[tuple[float, str]] = []
            with client.stream("GET", f"/v1/tasks/{task['id']}/events", timeout=30) as stream:
                for line in stream.iter_lines():
                    if line.startswith("event: "):
                        arrivals.append((time.monotonic(), line[7:]))
            token_times = [t for t, kind in arrivals if kind == "tokens"]
            assert arrivals[-1][1] == "record" and len(token_times) >= 2
            assert arrivals[-1][0] - token_times[0] > 0.5, "the stream was buffered"

            second.terminate()
            second.wait(timeout=30)
            time.sleep(2.5)  # the active health check (every 1 s) notices
            answers = [client.get("/v1/stats") for _ in range(20)]
            assert all(r.status_code == 200 for r in answers)
            assert {r.json()["replica"]["id"] for r in answers} < seen


@pytest.mark.parametrize("doc", ["deploy.md", "deploy.zh.md"])
def test_deploy_docs_walk_every_kit_file_and_list_the_fixes(doc: str):
    text = (ROOT / "docs" / doc).read_text()
    for path in [*COMPOSE_FILES, *CADDYFILES, DEPLOY / "provision.sh", *WORKFLOWS]:
        name = str(path.relative_to(ROOT))
        assert name in text or path.name in text, f"{doc} does not mention {name}"
    table_rows = [line for line in text.splitlines() if line.startswith("| ") and "→" not in line]
    assert len(table_rows) >= 12, "the guide-to-kit table lists each fix"


@pytest.mark.parametrize("doc", ["deploy.md", "deploy.zh.md"])
def test_the_docs_make_the_keys_the_worker_needs_to_start(doc: str, tmp_path: Path):
    """The deploy guide's own commands, run on the env example, give a worker that starts
    on 0.0.0.0 (the image's HOST): an API key and a valid callback secret."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    env_file = tmp_path / ".env.production"
    env_file.write_text((DEPLOY / "app" / ".env.production.example").read_text())
    commands = [
        line.split("   #")[0]
        for line in (ROOT / "docs" / doc).read_text().splitlines()
        if line.startswith("sed -i ") and ".env.production" in line
    ]
    assert len(commands) == 2
    for command in commands:
        done = subprocess.run(["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    from llmworker.settings import load_settings

    # The guide then has the user fill in a provider key.
    settings = load_settings({"HOST": "0.0.0.0", "DEEPSEEK_API_KEY": "sk-x"}, env_file=env_file)
    assert len(settings.api_keys) == 64 and settings.callback_secret
    with pytest.raises(Exception, match="API_KEYS"):
        load_settings(
            {"HOST": "0.0.0.0", "DEEPSEEK_API_KEY": "sk-x"},
            env_file=DEPLOY / "app" / ".env.production.example",
        )
