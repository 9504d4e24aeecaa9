"""Service throughput: 1 and 8 concurrent clients over HTTP, images per second and latency.

    python bench/serve.py                              # the built-in model
    python bench/serve.py --models-dir DIR --model NAME --steps 20 --requests 6

Starts ``malerei serve`` (in-process worker) on a fresh data dir pinned to 2 CPU cores, makes a
user with credits and an API key, warms the model up, then for each concurrency level runs that
many clients; each client submits a txt2img job (``POST /v1/jobs``), follows its progress
events (``GET /v1/jobs/{id}/events``) to the end, and repeats. Reports images/s over the whole
run and p50/p95 of submit-to-result latency; the goal is that 8 clients get at least 3x the
images per second of 1, which only batching compatible jobs into one UNet call achieves.

The levels run ``--rounds`` times interleaved (1, 8, 1, 8, ...), so a slow minute of a shared
machine touches both sides of a ratio; the summary gives medians. Last, the engine alone (no
HTTP, no database) generates 1 and 8 images per call on the same cores: its ratio is the most
that batching can give the service on this machine and model.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
LAUNCH = ("import argparse, sys; from malerei.commands import serve as m; p = argparse.ArgumentParser(); "
          "m.register(p.add_subparsers(required=True)); a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pinned(cmd: list[str], args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """``cmd`` on ``--cores`` (taskset, where there is one) and its environment with ``--threads``."""
    if shutil.which("taskset") and args.cores:
        cmd = ["taskset", "-c", args.cores, *cmd]
    return cmd, dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(REPO))


def start_server(data_dir: Path, args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-c", LAUNCH, "serve", "--port", str(port), "--data-dir", str(data_dir),
           "--set", "rate_limit_per_minute=0", "--set", f"batch_max={args.batch_max}"]
    if args.dtype:
        cmd += ["--set", f"dtype={args.dtype}"]
    if args.models_dir:
        cmd += ["--models-dir", str(args.models_dir)]
    if args.model:
        cmd += ["--default-model", args.model]
    cmd, env = pinned(cmd, args)
    log = open(data_dir / "server.log", "wb")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"server exited: {(data_dir / 'server.log').read_text()[-2000:]}")
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    sys.exit("server did not start")


def make_key(data_dir: Path) -> str:
    sys.path.insert(0, str(REPO))
    from malerei.serve import credits
    from malerei.serve.accounts.keys import create_key
    from malerei.serve.accounts.users import create_user
    from malerei.serve.db.migrate import upgrade
    from malerei.serve.db.session import Database

    db = Database(f"sqlite:///{data_dir / 'malerei.db'}")
    upgrade(db)
    with db.write() as session:
        user = create_user(session, "bench")
        _, key = create_key(session, user)
        credits.grant(session, user, 10**9)
    db.dispose()
    return key


def one_job(client: httpx.Client, body: dict) -> tuple[float, int]:
    """Submit, follow the event stream to the end; (latency seconds, images)."""
    started = time.perf_counter()
    job = client.post("/v1/jobs", json=body)
    job.raise_for_status()
    job_id = job.json()["id"]
    done = None
    with client.stream("GET", f"/v1/jobs/{job_id}/events") as stream:
        event = None
        for line in stream.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event == "done":
                done = json.loads(line[6:])
    if done is None or done["status"] != "succeeded":
        raise RuntimeError(f"job {job_id} did not succeed: {done}")
    return time.perf_counter() - started, len(done["images"])


def run_level(url: str, key: str, clients: int, requests: int, body: dict) -> dict:
    latencies: list[float] = []
    images = 0
    lock = threading.Lock()
    errors: list[BaseException] = []

    def client_loop(index: int) -> None:
        nonlocal images
        with httpx.Client(base_url=url, timeout=600, headers={"Authorization": f"Bearer {key}"}) as client:
            for i in range(requests):
                try:
                    latency, n = one_job(client, {**body, "prompt": f"{body['prompt']} {index}-{i}",
                                                  "seed": index * 1000 + i})
                except BaseException as exc:  # noqa: BLE001 - reported below
                    errors.append(exc)
                    return
                with lock:
                    latencies.append(latency)
                    images += n

    started = time.perf_counter()
    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    if errors:
        raise errors[0]
    latencies.sort()
    return {"clients": clients, "jobs": len(latencies), "images": images, "seconds": round(wall, 2),
            "images_per_s": round(images / wall, 3),
            "p50_s": round(statistics.median(latencies), 3),
            "p95_s": round(latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))], 3)}


ENGINE_CEILING = """
import json, sys, time
from pathlib import Path
from malerei.engine.batch import generate_many
from malerei.engine.loading import load_model
from malerei.engine.pipeline import GenerationParams
a = json.loads(sys.argv[1])
model = load_model(a["model"], models_dir=a["models_dir"] and Path(a["models_dir"]), dtype=a["dtype"])
def per_image(n):
    ps = [GenerationParams(prompt="a red circle", seed=i, width=a["width"], height=a["height"], steps=a["steps"])
          for i in range(n)]
    generate_many(model, ps, preview_every=0)
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        generate_many(model, ps, preview_every=0)
        best = min(best, (time.perf_counter() - t) / n)
    return best
print(json.dumps({str(n): per_image(n) for n in a["levels"]}))
"""


def engine_ceiling(args: argparse.Namespace, levels: list[int]) -> dict[int, float]:
    """Seconds per image when the engine alone generates ``n`` images per call (no HTTP, no
    database), on the same cores, threads and precision as the server: the most that batching
    can give the service."""
    spec = {"model": args.model, "models_dir": str(args.models_dir) if args.models_dir else None,
            "dtype": args.dtype, "width": args.width, "height": args.height, "steps": args.steps, "levels": levels}
    cmd, env = pinned([sys.executable, "-c", ENGINE_CEILING, json.dumps(spec)], args)
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout
    return {int(k): v for k, v in json.loads(out.strip().splitlines()[-1]).items()}


def batch_sizes(log: Path, start: int) -> float:
    """Mean jobs per worker batch (one UNet call) in the server log from byte `start` on."""
    with open(log, "rb") as handle:
        handle.seek(start)
        sizes = [int(m) for m in re.findall(rb"running (\d+) job", handle.read())]
    return statistics.mean(sizes) if sizes else 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models-dir", type=Path, default=None)
    parser.add_argument("--model", default=None, help="model name (default: the built-in model)")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--requests", type=int, default=12,
                        help="jobs per client per level (enough that steady state outweighs the ramp-up and tail)")
    parser.add_argument("--levels", default="1,8")
    parser.add_argument("--cores", default="0,1", help="CPU cores for the server (taskset); '' for all")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch/OpenMP threads; 1 avoids oversubscribing 2 cores shared with the API threads")
    parser.add_argument("--batch-max", type=int, default=8)
    parser.add_argument("--dtype", default=None, help="the worker's precision (fp32, bf16; default: the engine's)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="run the levels this many times, interleaved (1, 8, 1, 8, ...): the machine's "
                             "drift then touches every level alike; the summary takes medians")
    parser.add_argument("--no-engine", action="store_true", help="skip the engine-alone ceiling")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    levels = [int(level) for level in args.levels.split(",")]

    data_dir = Path(tempfile.mkdtemp(prefix="malerei-bench-"))
    key = make_key(data_dir)
    proc, url = start_server(data_dir, args)
    body = {"prompt": "a red circle", "width": args.width, "height": args.height, "steps": args.steps}
    results = []
    try:
        with httpx.Client(base_url=url, timeout=600, headers={"Authorization": f"Bearer {key}"}) as client:
            one_job(client, body)  # warm-up: model load, first-call costs
        for round_ in range(1, args.rounds + 1):
            for level in levels:
                log_from = (data_dir / "server.log").stat().st_size
                results.append({"round": round_, **run_level(url, key, level, args.requests, body)})
                results[-1]["jobs_per_unet_call"] = batch_sizes(data_dir / "server.log", log_from)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    ceiling = {} if args.no_engine else engine_ceiling(args, levels)

    print(f"{'round':>5} {'clients':>7} {'jobs':>5} {'images/s':>9} {'p50 s':>7} {'p95 s':>7} {'jobs per UNet call':>19}")
    for r in results:
        print(f"{r['round']:>5} {r['clients']:>7} {r['jobs']:>5} {r['images_per_s']:>9.3f} {r['p50_s']:>7.2f} "
              f"{r['p95_s']:>7.2f} {r['jobs_per_unet_call']:>19.2f}")
    base, top = levels[0], levels[-1]
    rate = {(r["round"], r["clients"]): r["images_per_s"] for r in results}
    ratios = [rate[(k, top)] / rate[(k, base)] for k in range(1, args.rounds + 1)]
    median_rate = {level: statistics.median(rate[(k, level)] for k in range(1, args.rounds + 1)) for level in levels}
    summary_rows = [(f"service, {level} client{'s' * (level > 1)} (median)", median_rate[level]) for level in levels]
    if ceiling:
        summary_rows += [(f"engine alone, {level} per call", 1 / ceiling[level]) for level in levels]
    print(f"\n{'':<28} {'images/s':>9}")
    for name, value in summary_rows:
        print(f"{name:<28} {value:>9.3f}")
    if len(levels) > 1:
        # the ratio within each round (its two levels measured minutes apart) is the robust figure
        print(f"speed-up {top} vs {base} clients per round: {', '.join(f'{x:.2f}x' for x in ratios)}; "
              f"median {statistics.median(ratios):.2f}x"
              + (f" (engine alone: {ceiling[base] / ceiling[top]:.2f}x)" if ceiling else ""))
    summary = {"settings": {k: str(v) for k, v in vars(args).items()}, "results": results,
               "ratios": ratios, "engine_s_per_image": ceiling}
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    shutil.rmtree(data_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
