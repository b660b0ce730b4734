"""Expert gateway under load: our gateway against nginx (``least_conn``) and vllm-router, same backends,
same load generator, one run.

    benchmarks/setup-gateway   # once: nginx and wrk (Debian packages), vllm-router (the `bench` extra)
    .venv/bin/python -m benchmarks.gateway [--duration 8] [--concurrency 64 256 1024]

Backends: fake vLLM pods (``tests.fake_backend``) with a fixed latency (50 ms). Load: ``wrk``
(C, closed loop: each connection sends its next request when the last one is answered), so the load
generator costs little CPU next to the proxies. ``direct`` is wrk against the backends themselves
(one wrk per backend, concurrency split evenly): added latency is the proxy's mean/p50/p99 minus
direct's. Every proxy runs one worker process; ``cpu_us_per_req`` is its processes' CPU time (user +
system, from /proc) over the requests served. Scenarios:

* steady: throughput and added latency at each concurrency; ideal throughput = concurrency / latency.
* fail-over: one of the two backends SIGKILLed a third into the run: failed client requests.
* heterogeneous: one backend 3x slower: p99 with least-outstanding vs round-robin (ours).

Targets (one gateway worker): throughput >= 90% of ideal, added mean <= 2 ms and p99 <= 10 ms, all
at 256; throughput within 20% of vllm-router's at every concurrency. At 1024 every proxy here is
CPU-bound on a 2-core machine shared with the backends and wrk, so its added latency is queueing: it is
reported for every proxy, not judged. All loopback; bounded in time.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from contextlib import ExitStack, contextmanager
from pathlib import Path

import yaml

from benchmarks.common import print_table, write_result
from eapo.core.net import free_port

BODY = '{"model": "expert", "messages": [{"role": "user", "content": "what is 17*23?"}], "max_tokens": 16}'
WRK_SCRIPT = f"""wrk.method = "POST"
wrk.body = '{BODY}'
wrk.headers["Content-Type"] = "application/json"
"""
NGINX_CONF = """worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    upstream experts {{
        least_conn;
{servers}
        keepalive 1024;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://experts;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_next_upstream error timeout http_500 http_502 http_503 non_idempotent;
            proxy_read_timeout 60s;
        }}
    }}
}}
"""


def wait_http(url: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not answer within {timeout_s}s") from None
            time.sleep(0.1)


@contextmanager
def process(argv: list[str], ready_url: str | None, **kw):
    """A child process, ready when ``ready_url`` answers. Its stderr goes to a file (a pipe nobody reads
    would block it once full) whose tail is shown if it never becomes ready."""
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log, **kw)
        try:
            if ready_url:
                try:
                    wait_http(ready_url)
                except RuntimeError as exc:
                    log.seek(0)
                    said = log.read()[-2000:].decode(errors="replace")
                    raise RuntimeError(f"{exc}; {argv[:4]} wrote: {said}") from None
            yield proc
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()


@contextmanager
def backends(latencies_ms: list[float]):
    with ExitStack() as stack:
        urls, procs = [], []
        for i, latency in enumerate(latencies_ms):
            port = free_port()
            argv = [sys.executable, "-m", "tests.fake_backend", "--port", str(port), "--name", f"b{i}",
                    "--latency-ms", str(latency)]  # fmt: skip
            procs.append(stack.enter_context(process(argv, f"http://127.0.0.1:{port}/health")))
            urls.append(f"http://127.0.0.1:{port}")
        yield urls, procs


@contextmanager
def ours(urls: list[str], tmp: Path, policy: str = "least_outstanding"):
    port = free_port()
    cfg = {"gateway": {"host": "127.0.0.1", "port": port, "policy": policy, "queue_size": 4096,
                       "backends": [{"model": "expert", "url": u} for u in urls],
                       "health_interval_s": 1.0, "eject_after_failures": 1, "eject_s": 60.0}}  # fmt: skip
    path = tmp / f"gateway-{port}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    argv = [sys.executable, "-m", "eapo.cli", "gateway", "--config", str(path)]
    with process(argv, f"http://127.0.0.1:{port}/readyz") as proc:
        yield f"http://127.0.0.1:{port}", proc.pid


@contextmanager
def nginx(urls: list[str], tmp: Path):
    port, workdir = free_port(), tmp / f"nginx-{free_port()}"
    workdir.mkdir()
    servers = "\n".join(f"        server {u.removeprefix('http://')} max_fails=1 fail_timeout=60s;" for u in urls)
    (workdir / "nginx.conf").write_text(NGINX_CONF.format(dir=workdir, servers=servers, port=port))
    argv = ["nginx", "-c", str(workdir / "nginx.conf"), "-p", str(workdir)]
    with process(argv, None) as proc:
        time.sleep(0.5)
        yield f"http://127.0.0.1:{port}", proc.pid


@contextmanager
def vllm_router(urls: list[str], tmp: Path):
    port = free_port()
    exe = shutil.which("vllm-router", path=str(Path(sys.executable).parent)) or "vllm-router"
    argv = [exe, "--host", "127.0.0.1", "--port", str(port), "--worker-urls", *urls, "--policy", "power_of_two",
            "--log-level", "error", "--max-concurrent-requests", "8192", "--queue-size", "8192",
            "--prometheus-port", str(free_port()), "--health-check-interval-secs", "1"]  # fmt: skip
    with process(argv, f"http://127.0.0.1:{port}/health") as proc:
        yield f"http://127.0.0.1:{port}", proc.pid


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process (all its threads) and its children (nginx's worker)."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if stat.parent.name == str(pid) or fields[1] == str(pid):  # fields[1]: the parent's pid
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()
    return float(value) * _UNITS[unit]


def wrk(url: str, concurrency: int, duration_s: float, script: Path) -> dict:
    """One closed-loop wrk run; its counts and latency distribution."""
    threads = min(2, concurrency)
    out = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{concurrency}", f"-d{round(duration_s)}s", "--timeout", "10s", "--latency",
         "-s", str(script), f"{url}/v1/chat/completions"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    latency = re.search(r"Latency\s+([\d.]+\w+)\s+([\d.]+\w+)\s+([\d.]+\w+)", out)
    pct = dict(re.findall(r"^\s+(50|75|90|99)%\s+([\d.]+\w+)", out, re.M))
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {
        "requests": requests,
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "mean_ms": _ms(latency.group(1)),
        "p50_ms": _ms(pct["50"]),
        "p99_ms": _ms(pct["99"]),
        "failed": (int(non2xx.group(1)) if non2xx else 0) + (sum(map(int, socket.groups())) if socket else 0),
    }


def direct(urls: list[str], concurrency: int, duration_s: float, script: Path) -> dict:
    """wrk against every backend at once, concurrency split evenly; latencies are request-weighted means
    (p50/p99: the worse backend's, which for identical backends is the same distribution)."""
    results: list[dict] = [{} for _ in urls]

    def run(i: int) -> None:
        results[i] = wrk(urls[i], concurrency // len(urls), duration_s, script)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(urls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    n = sum(r["requests"] for r in results)
    return {
        "requests": n,
        "rps": sum(r["rps"] for r in results),
        "mean_ms": sum(r["mean_ms"] * r["requests"] for r in results) / n,
        "p50_ms": max(r["p50_ms"] for r in results),
        "p99_ms": max(r["p99_ms"] for r in results),
        "failed": sum(r["failed"] for r in results),
    }


def failover(proxy, tmp: Path, duration_s: float, script: Path, concurrency: int) -> dict:
    with backends([50.0, 50.0]) as (urls, procs), proxy(urls, tmp) as (url, _):
        killer = threading.Timer(duration_s / 3, lambda: os.kill(procs[1].pid, signal.SIGKILL))
        killer.start()
        result = wrk(url, concurrency, duration_s, script)
        killer.join()
    return result


def main(args: argparse.Namespace) -> None:
    missing = [tool for tool in ("nginx", "wrk") if shutil.which(tool) is None]
    if missing or shutil.which("vllm-router", path=str(Path(sys.executable).parent)) is None:
        sys.exit(f"missing {missing or ['vllm-router']}: run benchmarks/setup-gateway first")
    proxies = {"eapo": ours, "nginx": nginx, "vllm-router": vllm_router}
    steady: list[dict] = []
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        script = tmp / "post.lua"
        script.write_text(WRK_SCRIPT)
        with backends([args.latency_ms] * args.backends) as (urls, _):
            for c in args.concurrency:
                base = direct(urls, c, args.duration, script)
                steady.append({"target": "direct", "concurrency": c, **base})
                for name, proxy in proxies.items():
                    with proxy(urls, tmp) as (url, pid):
                        wrk(url, min(c, 64), 1, script)  # warm-up: connections, JIT-free but caches
                        cpu0 = cpu_seconds(pid)
                        r = wrk(url, c, args.duration, script)
                        r["cpu_us_per_req"] = (cpu_seconds(pid) - cpu0) / r["requests"] * 1e6
                    steady.append({"target": name, "concurrency": c, **r})
                    print(f"  {name} c={c}: {r['rps']:.0f} req/s, mean {r['mean_ms']:.1f} ms", flush=True)
        fail = {
            name: failover(proxies[name], tmp, args.duration * 1.5, script, 256) for name in ("eapo", "vllm-router")
        }
        hetero = {}
        for policy in ("least_outstanding", "round_robin"):
            with backends([args.latency_ms, 3 * args.latency_ms]) as (urls, _), ours(urls, tmp, policy) as (url, _):
                hetero[policy] = wrk(url, 256, args.duration, script)

    ideal = {c: c / (args.latency_ms / 1000) for c in args.concurrency}
    by = {(r["target"], r["concurrency"]): r for r in steady}
    for r in steady:
        c, base = r["concurrency"], by[("direct", r["concurrency"])]
        r["of_ideal"] = r["rps"] / ideal[c]
        r["added_mean_ms"] = r["mean_ms"] - base["mean_ms"]
        r["added_p50_ms"] = r["p50_ms"] - base["p50_ms"]
        r["added_p99_ms"] = r["p99_ms"] - base["p99_ms"]
        r["vs_vllm_router"] = r["rps"] / by[("vllm-router", c)]["rps"]
    print(f"\n{args.backends} backends x {args.latency_ms:.0f} ms, wrk closed loop {args.duration:.0f}s per cell\n")
    print_table(steady, ["target", "concurrency", "rps", "of_ideal", "vs_vllm_router", "cpu_us_per_req", "mean_ms",
                         "added_mean_ms", "added_p50_ms", "added_p99_ms", "failed"])  # fmt: skip
    print("\nfail-over (one of two backends SIGKILLed a third into the run, concurrency 256)\n")
    fo_rows = [{"target": n, **r} for n, r in fail.items()]
    print_table(fo_rows, ["target", "requests", "failed", "rps", "mean_ms", "p99_ms"])
    print("\nheterogeneous (one backend 3x slower, concurrency 256), our gateway\n")
    print_table([{"policy": p, **r} for p, r in hetero.items()], ["policy", "rps", "mean_ms", "p50_ms", "p99_ms"])

    ours_by = {r["concurrency"]: r for r in steady if r["target"] == "eapo"}
    at256 = ours_by.get(256)
    summary = {
        key: {c: r[key] for c, r in ours_by.items()}
        for key in ("of_ideal", "vs_vllm_router", "cpu_us_per_req", "added_mean_ms", "added_p99_ms")
    }
    summary |= {
        "failover_failed": {n: r["failed"] for n, r in fail.items()},
        "hetero_p99_ms": {p: r["p99_ms"] for p, r in hetero.items()},
    }
    targets = {
        "of_ideal_at_256_ge_0.9": bool(at256 and at256["of_ideal"] >= 0.9),
        "added_mean_le_2ms_at_256": bool(at256 and at256["added_mean_ms"] <= 2),
        "added_p99_le_10ms_at_256": bool(at256 and at256["added_p99_ms"] <= 10),
        "within_20pct_of_vllm_router_everywhere": min(summary["vs_vllm_router"].values()) >= 0.8,
        "failover_zero_failed": fail["eapo"]["failed"] == 0,
    }
    print("\n" + "\n".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in targets.items()))
    write_result(
        "gateway",
        vars(args),
        {"steady": steady, "failover": fail, "heterogeneous": hetero},
        summary,
        targets,
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=8, help="seconds of load per cell")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--backends", type=int, default=2)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    main(parser.parse_args())
