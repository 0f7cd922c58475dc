"""Serving throughput and latency of a registered ensemble behind ``inception-serve`` on 127.0.0.1.

Run::

    python -m benchmarks.bench_serving                       # a 2-member demo-sized ensemble
    python -m benchmarks.bench_serving --model models:/inception-v3-demo@champion \\
        --tracking-uri http://127.0.0.1:5000 --requests 64

For each crop setting (1 and 10 crops, the request's ``params.crops``) and each number of
concurrent clients (1 and 4), it sends ``--requests`` requests of one real JPEG each
(``data/cifar10-demo/test.tar.gz`` by default) after two warm-up requests, and prints requests/s
and the p50 / p95 / p99 latency, measured side by side in one run, with the 4-client / 1-client
throughput ratio. Without ``--model`` it registers two untrained members of the demo recipe
(Inception-v3, width 0.25, 75 px, 10 classes) in a temporary sqlite store: the networks'
arithmetic is that of the demo's ensemble, their weights do not matter for speed.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import os
import statistics
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_IMAGES = REPO / "data" / "cifar10-demo" / "test.tar.gz"


def read_jpegs(path: Path, n: int) -> list[bytes]:
    out = []
    with tarfile.open(path) as tar:
        for member in tar:
            if member.isfile() and member.name.lower().endswith((".jpg", ".jpeg")):
                out.append(tar.extractfile(member).read())
                if len(out) == n:
                    break
    if not out:
        raise SystemExit(f"bench_serving: no JPEG in {path}")
    return out


def demo_ensemble(root: Path) -> tuple[str, str]:
    """Register two untrained members of the demo recipe; returns (model URI, tracking URI)."""
    import torch

    import models
    from ops import registry
    from ops.checkpoint import save_checkpoint
    from pipeline.config import DataConfig

    uri = f"sqlite:///{root / 'mlflow.db'}"
    data = DataConfig(image_size=75, val_resize=86, normalization="imagenet")
    classes = [f"class{i}" for i in range(10)]
    sources = []
    for seed in range(2):
        torch.manual_seed(seed)
        net = models.build_model("inception_v3", 10, width_mult=0.25)
        state = net.state_dict()
        folder = root / f"member{seed}"
        spec = {"name": "inception_v3", "num_classes": 10, "options": {"width_mult": 0.25}}
        save_checkpoint(
            folder,
            {
                "model_spec": spec,
                "model": state,
                "ema": state,
                "epoch": 0,
                "step": 0,
                "config": {"data": dataclasses.asdict(data)},
                "class_names": classes,
            },
        )
        sources.append(str(folder))
    cwd = os.getcwd()
    os.chdir(root)  # a sqlite store keeps artifacts under ./mlruns
    try:
        mv = registry.register_ensemble(sources, "bench-serving", tracking_uri=uri, crops=1)
    finally:
        os.chdir(cwd)
    return f"models:/bench-serving/{mv.version}", uri


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def run_setting(url: str, images: list[str], crops: int, clients: int, requests_n: int) -> dict:
    import requests

    session_per_client = [requests.Session() for _ in range(clients)]

    def one(i: int) -> float:
        body = {
            "dataframe_split": {"columns": ["image"], "data": [[images[i % len(images)]]]},
            "params": {"crops": crops, "top_k": 5},
        }
        start = time.perf_counter()
        resp = session_per_client[i % clients].post(f"{url}/invocations", json=body, timeout=300)
        elapsed = time.perf_counter() - start
        if resp.status_code != 200:
            raise SystemExit(f"bench_serving: HTTP {resp.status_code}: {resp.text[:300]}")
        return elapsed

    for i in range(2):  # warm-up: first-request costs (threads, allocator) are not serving speed
        one(i)
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        latencies = list(pool.map(one, range(requests_n)))
    wall = time.perf_counter() - start
    return {
        "crops": crops,
        "clients": clients,
        "requests": requests_n,
        "rps": requests_n / wall,
        "p50": percentile(latencies, 50),
        "p95": percentile(latencies, 95),
        "p99": percentile(latencies, 99),
        "mean": statistics.fmean(latencies),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_serving", description=__doc__.split("\n\n")[0]
    )
    p.add_argument(
        "--model", default=None, help="models:/NAME@alias to serve (default: a demo-sized ensemble)"
    )
    p.add_argument(
        "--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"), help="registry of --model"
    )
    p.add_argument(
        "--images", type=Path, default=DEFAULT_IMAGES, help="tar(.gz) of JPEGs sent one per request"
    )
    p.add_argument("--requests", type=int, default=48, help="requests per setting (default 48)")
    p.add_argument("--clients", default="1,4", help="concurrent clients to try (default 1,4)")
    p.add_argument("--crops", default="1,10", help="crop settings to try (default 1,10)")
    args = p.parse_args(argv)
    if args.model and not args.tracking_uri:
        p.error("--model needs --tracking-uri (or MLFLOW_TRACKING_URI)")
    from ops.serving import served
    from ops.tracking import quiet_mlflow_console

    quiet_mlflow_console()
    clients = [int(c) for c in args.clients.split(",")]
    crops = [int(c) for c in args.crops.split(",")]
    images = [base64.b64encode(j).decode("ascii") for j in read_jpegs(args.images, 64)]
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        model, uri = (args.model, args.tracking_uri) if args.model else demo_ensemble(Path(tmp))
        print(
            f"serving {model} on 127.0.0.1; {len(images)} real JPEGs from {args.images}; "
            f"cpu cores {os.cpu_count()}"
        )
        results = []
        with served(model, uri, log_path=Path(tmp) / "serve.log") as url:
            for c in crops:
                for n in clients:
                    results.append(run_setting(url, images, c, n, args.requests))
                    r = results[-1]
                    print(
                        f"crops {c:>3}  clients {n}  {r['rps']:6.1f} req/s  p50 {1000 * r['p50']:6.0f} ms  "
                        f"p95 {1000 * r['p95']:6.0f} ms  p99 {1000 * r['p99']:6.0f} ms  "
                        f"({r['requests']} requests)",
                        flush=True,
                    )
    base = {r["crops"]: r["rps"] for r in results if r["clients"] == clients[0]}
    for r in results:
        if r["clients"] != clients[0]:
            print(
                f"crops {r['crops']}: {r['clients']} clients / {clients[0]} client(s) throughput "
                f"{r['rps'] / base[r['crops']]:.2f}x"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
