"""HTTP load from ``wrk``, a load generator written in C, for the request benchmarks.

A Python client on the same 2-core machine spends as much CPU per request as
the worker it measures, so its latencies include its own queueing; ``wrk``
costs a small fraction of that. ``wrk_recommend`` runs ``connections``
keep-alive connections, each sending ``POST /recommend`` for a random user of
``user_ids`` and waiting for the answer before the next (closed loop, like the
Python clients), and returns wrk's own latency percentiles and counts.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

# wrk's Lua API: ``request`` builds each request, ``done`` sees the latency
# histogram (microseconds) and the summary once the run ends.
SCRIPT = r"""
local users = {%(users)s}
local sent = 0
math.randomseed(%(seed)d)
request = function()
  sent = sent + 1
  local user = users[math.random(#users)]
  local body = '{"request_id":"wrk-' .. sent .. '-' .. math.random(1000000000) .. '","user_id":"' .. user .. '","k":%(k)d}'
  return wrk.format("POST", "/recommend", {["Content-Type"] = "application/json"}, body)
end
done = function(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format(
    'WRK-RESULT {"requests":%%d,"duration_us":%%d,"p50_us":%%d,"p90_us":%%d,"p99_us":%%d,"p999_us":%%d,' ..
    '"max_us":%%d,"connect_errors":%%d,"read_errors":%%d,"write_errors":%%d,"status_errors":%%d,"timeouts":%%d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max, errors.connect, errors.read, errors.write, errors.status, errors.timeout))
end
"""


def available() -> bool:
    return shutil.which("wrk") is not None


def wrk_recommend(base_url: str, user_ids: list[str], *, connections: int, seconds: float, seed: int,
                  k: int = 10, threads: int = 2) -> dict[str, float]:
    """One wrk run against ``base_url``; latencies in ms, ``requests_per_s``, ``errors`` (any kind)."""
    if not available():
        raise RuntimeError("wrk is not installed (Debian: apt-get install wrk)")
    script = SCRIPT % {"users": ",".join(json.dumps(u) for u in user_ids), "seed": seed, "k": k}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "recommend.lua"
        path.write_text(script)
        done = subprocess.run(
            ["wrk", f"-t{min(threads, connections)}", f"-c{connections}", f"-d{max(1, round(seconds))}s",
             "--timeout", "10s", "-s", str(path), base_url],
            capture_output=True, text=True, timeout=seconds + 60, check=False,
        )
    line = next((l for l in done.stdout.splitlines() if l.startswith("WRK-RESULT ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed (exit {done.returncode}): {done.stderr.strip() or done.stdout.strip()}")
    raw = json.loads(line.removeprefix("WRK-RESULT "))
    errors = sum(raw[key] for key in ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts"))
    return {
        "p50_ms": raw["p50_us"] / 1000, "p90_ms": raw["p90_us"] / 1000, "p99_ms": raw["p99_us"] / 1000,
        "p999_ms": raw["p999_us"] / 1000, "max_ms": raw["max_us"] / 1000,
        "requests": raw["requests"], "requests_per_s": raw["requests"] / (raw["duration_us"] / 1e6),
        "errors": errors,
    }
