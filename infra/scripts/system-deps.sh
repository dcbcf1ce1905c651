#!/usr/bin/env bash
# System packages the test suite needs: Prometheus (promtool and a real server
# for the dashboard queries) and docker-compose (validates docker-compose.yml
# without an engine). Installed from Debian's archive when missing.
set -euo pipefail
need=()
command -v prometheus >/dev/null 2>&1 || need+=(prometheus)
command -v docker-compose >/dev/null 2>&1 || need+=(docker-compose)
if [ ${#need[@]} -eq 0 ]; then exit 0; fi
if [ "$(id -u)" -ne 0 ]; then
  echo "system-deps: missing ${need[*]}; install them (apt-get install ${need[*]}) or run as root" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# The package starts a system service; the tests start their own server.
(service prometheus stop || true) >/dev/null 2>&1
