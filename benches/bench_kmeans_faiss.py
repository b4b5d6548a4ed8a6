"""gsrq k-means and GSKM against faiss k-means: seconds per iteration and final objective.

Both libraries get the same float32 data (standard Gaussian, seeded), the same K,
the same number of Lloyd iterations, the same thread count
(``faiss.omp_set_num_threads`` / ``threads=``), random-sample initialisation, and
no subsampling (faiss ``max_points_per_centroid`` above N). Time per iteration is
the wall time of the whole call divided by its iterations (so initialisation and
the final assignment are included on both sides); each timing is the best of
``--repeats`` runs, the three learners interleaved. GSKM's iterations are its
``init_iters`` spherical Lloyd steps plus its ``iters`` alternating steps. The
objectives (weighted SSE, all weights 1) of the final centroids are evaluated by
one common exact nearest-centroid pass.

    nice -n 10 python benches/bench_kmeans_faiss.py            # the README table
    python benches/bench_kmeans_faiss.py --shapes 20000x8x64 --threads 1 --iters 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

DEFAULT_SHAPES = ["100000x8x256", "100000x16x256", "100000x32x1024", "100000x128x256", "1000000x8x256"]


def parse_shape(s: str) -> tuple[int, int, int]:
    try:
        n, d, k = (int(v) for v in s.lower().split("x"))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"shape must look like NxDxK, got {s!r}") from e
    if min(n, d, k) < 1 or k > n:
        raise argparse.ArgumentTypeError(f"need N, D, K >= 1 and K <= N, got {s!r}")
    return n, d, k


def sse(x: np.ndarray, c: np.ndarray) -> float:
    """Σ‖x − nearest c‖² in float64 (nearest by gsrq's exact kernel, distance recomputed in f64)."""
    from gsrq import _gsrq

    codes = _gsrq.rq_encode(x, np.ascontiguousarray(c[None], np.float32), 1, None)[:, 0].astype(np.int64)
    total = 0.0
    for s in range(0, len(x), 65536):
        diff = x[s : s + 65536].astype(np.float64) - c[codes[s : s + 65536]].astype(np.float64)
        total += float((diff * diff).sum())
    return total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", type=parse_shape, default=[parse_shape(s) for s in DEFAULT_SHAPES],
                    help="NxDxK shapes (default: %(default)s)")
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--iters", type=int, default=10, help="Lloyd iterations of KM and faiss")
    ap.add_argument("--gskm-init-iters", type=int, default=10)
    ap.add_argument("--gskm-iters", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the rows to this JSON file")
    args = ap.parse_args(argv)

    import faiss
    from tqdm import tqdm

    import gsrq

    rows = []
    jobs = [(shape, t) for shape in args.shapes for t in args.threads]
    data_cache: dict[tuple[int, int], np.ndarray] = {}
    for (n, d, k), t in tqdm(jobs, desc="shapes", file=sys.stderr):
        if (n, d) not in data_cache:
            data_cache.clear()
            data_cache[(n, d)] = np.random.default_rng(args.seed).standard_normal((n, d), dtype=np.float32)
        x = data_cache[(n, d)]
        faiss.omp_set_num_threads(t)
        best = {"faiss": float("inf"), "km": float("inf"), "gskm": float("inf")}
        cents: dict[str, np.ndarray] = {}
        for rep in range(args.repeats):
            t0 = time.perf_counter()
            km = faiss.Kmeans(d, k, niter=args.iters, seed=args.seed + 1 + rep, max_points_per_centroid=n + 1,
                              min_points_per_centroid=1, verbose=False)
            km.train(x)
            best["faiss"] = min(best["faiss"], (time.perf_counter() - t0) / args.iters)
            cents["faiss"] = km.centroids.copy()

            t0 = time.perf_counter()
            c, _ = gsrq.kmeans(x, k, iters=args.iters, init="random", seed=args.seed + rep, threads=t)
            best["km"] = min(best["km"], (time.perf_counter() - t0) / args.iters)
            cents["km"] = c

            t0 = time.perf_counter()
            c, _ = gsrq.gskm(x, k, init_iters=args.gskm_init_iters, iters=args.gskm_iters, init="random",
                             seed=args.seed + rep, threads=t)
            best["gskm"] = min(best["gskm"], (time.perf_counter() - t0) / (args.gskm_init_iters + args.gskm_iters))
            cents["gskm"] = c
        obj = {name: sse(x, c) for name, c in cents.items()}
        rows.append({
            "N": n, "D": d, "K": k, "threads": t,
            "faiss_s_per_iter": best["faiss"], "km_s_per_iter": best["km"], "gskm_s_per_iter": best["gskm"],
            "km_over_faiss": best["km"] / best["faiss"], "gskm_over_km": best["gskm"] / best["km"],
            "sse_faiss": obj["faiss"], "sse_km": obj["km"], "sse_gskm": obj["gskm"],
            "km_gap_pct": 100 * (obj["km"] - obj["faiss"]) / obj["faiss"],
        })

    print(f"# gsrq {gsrq.__version__} vs faiss {faiss.__version__}; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs; iters={args.iters} (KM, faiss), GSKM {args.gskm_init_iters}+{args.gskm_iters}; "
          f"best of {args.repeats}")
    print()
    print("| N | D | K | threads | faiss s/it | KM s/it | KM/faiss | GSKM s/it | GSKM/KM | SSE faiss | SSE KM | KM gap | SSE GSKM |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['N']} | {r['D']} | {r['K']} | {r['threads']} | {r['faiss_s_per_iter']:.4f} | "
              f"{r['km_s_per_iter']:.4f} | {r['km_over_faiss']:.2f}× | {r['gskm_s_per_iter']:.4f} | "
              f"{r['gskm_over_km']:.2f}× | {r['sse_faiss']:.5g} | {r['sse_km']:.5g} | {r['km_gap_pct']:+.2f}% | "
              f"{r['sse_gskm']:.5g} |")
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(rows, f, indent=1)
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
