#!/usr/bin/env bash
# Prepare a fresh Debian/Ubuntu VPS for llmworker (the deployment guide's "server
# initialisation", made repeatable). Safe to run again: every step checks before it
# changes anything, and a second run changes nothing.
#
#   sudo ./provision.sh                       # everything
#   sudo ./provision.sh --dry-run             # print what it would do, change nothing
#   sudo ./provision.sh --only sysctl,layout  # some steps
#   ./provision.sh --root /tmp/x --only sysctl,layout   # write files under another root
#
# Steps: packages (updates and base tools), sysctl (BBR), firewall (ufw: 22, 80, 443),
# docker (engine and compose plugin), layout (/opt/caddy, /opt/ops, /opt/<tenant>),
# network (the shared Docker network "web" that Caddy and the workers join).
set -euo pipefail

DRY_RUN=0
ROOT=""
ONLY="packages,sysctl,firewall,docker,layout,network"
TENANTS="${TENANTS:-career-worker}"
NETWORK="${NETWORK:-web}"
CHANGED=0

usage() {
  sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'
}

while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --root) ROOT="${2:?--root needs a directory}"; shift ;;
    --only) ONLY="${2:?--only needs a list of steps}"; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "provision.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done

say() { printf '==> %s\n' "$*"; }

# Run a command, or only show it with --dry-run.
execute() {
  if [ "$DRY_RUN" -eq 1 ]; then
    printf '+ %s\n' "$*"
  else
    "$@"
  fi
}

# The same, for a command that changes the server's state.
run() {
  execute "$@"
  CHANGED=1
}

wants() {
  case ",$ONLY," in *",$1,"*) return 0 ;; *) return 1 ;; esac
}

# Write a file only when its content differs, so reruns leave it (and its mtime) alone.
write_file() {
  local path="$ROOT$1" content="$2"
  if [ -f "$path" ] && [ "$(cat "$path")" = "$content" ]; then
    say "unchanged: $1"
    return 1
  fi
  if [ "$DRY_RUN" -eq 1 ]; then
    printf '+ write %s:\n%s\n' "$1" "$content"
  else
    mkdir -p "$(dirname "$path")"
    printf '%s\n' "$content" > "$path"
    say "wrote: $1"
  fi
  CHANGED=1
  return 0
}

ensure_dir() {
  local path="$ROOT$1"
  if [ -d "$path" ]; then
    say "unchanged: $1/"
  else
    run mkdir -p "$path"
    say "created: $1/"
  fi
}

step_packages() {
  say "packages: updates and base tools"
  # apt itself changes nothing when everything is current and installed.
  execute env DEBIAN_FRONTEND=noninteractive apt-get update -q
  execute env DEBIAN_FRONTEND=noninteractive apt-get upgrade -y -q
  execute env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
    ca-certificates curl wget git vim unzip ufw htop
}

step_sysctl() {
  say "sysctl: BBR congestion control"
  # A drop-in file instead of appending to /etc/sysctl.conf: reruns never add duplicate lines.
  if write_file /etc/sysctl.d/99-llmworker-bbr.conf "net.core.default_qdisc=fq
net.ipv4.tcp_congestion_control=bbr"; then
    if [ -z "$ROOT" ]; then
      run sysctl --system
    fi
  fi
}

step_firewall() {
  say "firewall: allow SSH, HTTP, HTTPS; deny the rest"
  local port
  for port in 22/tcp 80/tcp 443/tcp 443/udp; do
    if ufw status 2>/dev/null | grep -qE "^${port}[[:space:]]+ALLOW"; then
      say "unchanged: ufw allows $port"
    else
      run ufw allow "$port"
    fi
  done
  if ufw status 2>/dev/null | grep -q "Status: active"; then
    say "unchanged: ufw is active"
  else
    run ufw --force enable
  fi
}

step_docker() {
  say "docker: engine and compose plugin"
  if command -v docker >/dev/null 2>&1 && docker compose version >/dev/null 2>&1; then
    say "unchanged: $(docker --version)"
  else
    # Docker's own convenience script installs the engine and the compose plugin from
    # Docker's apt repository.
    run sh -c "curl -fsSL https://get.docker.com | sh"
  fi
  if command -v systemctl >/dev/null 2>&1 && ! systemctl is-enabled --quiet docker 2>/dev/null; then
    run systemctl enable --now docker
  fi
}

step_layout() {
  say "layout: /opt/caddy, /opt/ops and one folder per tenant"
  ensure_dir /opt/caddy
  ensure_dir /opt/ops
  local tenant
  for tenant in ${TENANTS//,/ }; do
    ensure_dir "/opt/$tenant"
  done
}

step_network() {
  say "network: shared Docker network '$NETWORK'"
  if docker network inspect "$NETWORK" >/dev/null 2>&1; then
    say "unchanged: network $NETWORK exists"
  else
    run docker network create "$NETWORK"
  fi
}

if [ -z "$ROOT" ] && [ "$DRY_RUN" -eq 0 ] && [ "$(id -u)" -ne 0 ]; then
  echo "provision.sh: run as root (sudo), or with --dry-run" >&2
  exit 1
fi

for step in packages sysctl firewall docker layout network; do
  if wants "$step"; then
    "step_$step"
  fi
done

if [ "$CHANGED" -eq 0 ]; then
  say "nothing to do: the server is provisioned"
fi
