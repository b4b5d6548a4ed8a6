"""The synthetic sweep of the GSRQ paper: KM against GSKM on standard Gaussian data.

One codebook (a single RQ stage) is learned by each method on ``--n`` training
vectors drawn from N(0, I_D), and both are measured on ``--n-test`` held-out
vectors from the same distribution, encoded to their nearest codeword:
MSE per element, mean cosine similarity and gain error (``gsrq.reconstruction_metrics``).

Sweeps: D ∈ {4, 8, 16, 32, 64, 128, 256, 512} at K = 1024, and
K ∈ {64, 128, 256, 512, 1024, 2048, 4096} at D = 256. KM: k-means++ and
``--km-iters`` Lloyd iterations; GSKM: the defaults of DESIGN.md §1
(20 spherical iterations, then 10 alternating). Writes ``sweep.md`` (the two
tables), ``sweep.json`` and ``sweep.png`` under ``--out``.

    nice -n 10 python benches/synthetic_sweep.py --out docs/results/sweep
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

D_SWEEP = [4, 8, 16, 32, 64, 128, 256, 512]
K_SWEEP = [64, 128, 256, 512, 1024, 2048, 4096]


def encode_one(x: np.ndarray, c: np.ndarray, threads: int | None) -> np.ndarray:
    from gsrq import _gsrq

    codes = _gsrq.rq_encode(x, np.ascontiguousarray(c[None], np.float32), 1, threads)[:, 0]
    return c[codes.astype(np.int64)]


def run_point(d: int, k: int, args: argparse.Namespace) -> dict:
    import gsrq

    rng = np.random.default_rng(args.seed + 1000 * d + k)
    x = rng.standard_normal((args.n, d), dtype=np.float32)
    xt = rng.standard_normal((args.n_test, d), dtype=np.float32)
    row: dict = {"D": d, "K": k, "N": args.n, "N_test": args.n_test}
    t0 = time.perf_counter()
    ck, _ = gsrq.kmeans(x, k, iters=args.km_iters, seed=args.seed, threads=args.threads)
    row["km_seconds"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    cg, _ = gsrq.gskm(x, k, seed=args.seed, threads=args.threads)
    row["gskm_seconds"] = time.perf_counter() - t0
    for name, c in (("km", ck), ("gskm", cg)):
        m = gsrq.reconstruction_metrics(xt, encode_one(xt, c, args.threads))
        for key, v in m.items():
            row[f"{name}_{key}"] = v
    return row


def table(rows: list[dict], vary: str) -> str:
    head = (f"| {vary} | MSE KM | MSE GSKM | cosine KM | cosine GSKM | Δcos | gain err KM | gain err GSKM |\n"
            "|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    lines = [
        f"| {r[vary]} | {r['km_mse']:.4f} | {r['gskm_mse']:.4f} | {r['km_cosine']:.4f} | {r['gskm_cosine']:.4f} | "
        f"{r['gskm_cosine'] - r['km_cosine']:+.4f} | {r['km_gain_error']:.4f} | {r['gskm_gain_error']:.4f} |"
        for r in rows
    ]
    return head + "\n".join(lines) + "\n"


def plot(d_rows: list[dict], k_rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for row_i, (rows, vary, fixed) in enumerate(((d_rows, "D", "K = 1024"), (k_rows, "K", "D = 256"))):
        xs = [r[vary] for r in rows]
        for col, (metric, label) in enumerate((("mse", "MSE per element"), ("cosine", "cosine similarity"),
                                                ("gain_error", "gain error"))):
            ax = axes[row_i][col]
            ax.plot(xs, [r[f"km_{metric}"] for r in rows], "o-", label="KM")
            ax.plot(xs, [r[f"gskm_{metric}"] for r in rows], "s-", label="GSKM")
            ax.set_xscale("log", base=2)
            ax.set_xlabel(vary)
            ax.set_title(f"{label} ({fixed})")
            ax.grid(True, alpha=0.3)
            ax.legend()
    fig.suptitle("KM vs GSKM on standard Gaussian data (held-out vectors)")
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def write_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output directory (created)")
    ap.add_argument("--n", type=int, default=32768, help="training vectors per point (>= the largest K)")
    ap.add_argument("--n-test", type=int, default=8192, help="held-out vectors per point")
    ap.add_argument("--km-iters", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None, help="default: the global pool (all cores)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--d-sweep", type=int, nargs="+", default=D_SWEEP)
    ap.add_argument("--k-sweep", type=int, nargs="+", default=K_SWEEP)
    args = ap.parse_args(argv)
    if args.n < max(max(args.k_sweep), 1024):
        ap.error(f"--n must be at least the largest K ({max(max(args.k_sweep), 1024)})")
    from tqdm import tqdm

    os.makedirs(args.out, exist_ok=True)
    points = [("D", d, 1024) for d in args.d_sweep] + [("K", 256, k) for k in args.k_sweep]
    done: dict[tuple[int, int], dict] = {}
    d_rows, k_rows = [], []
    t0 = time.perf_counter()
    for vary, d, k in tqdm(points, desc="sweep", file=sys.stderr):
        if (d, k) not in done:
            done[(d, k)] = run_point(d, k, args)
        (d_rows if vary == "D" else k_rows).append(done[(d, k)])
    elapsed = time.perf_counter() - t0

    text = (f"Standard Gaussian data, N = {args.n} training and {args.n_test} held-out vectors per point, "
            f"KM {args.km_iters} iterations (k-means++), GSKM 20 + 10 iterations; {elapsed:.0f} s in all.\n\n"
            f"D sweep at K = 1024:\n\n{table(d_rows, 'D')}\nK sweep at D = 256:\n\n{table(k_rows, 'K')}")
    print(text)
    write_atomic(os.path.join(args.out, "sweep.md"), text)
    write_atomic(os.path.join(args.out, "sweep.json"), json.dumps({"D": d_rows, "K": k_rows}, indent=1))
    plot(d_rows, k_rows, os.path.join(args.out, "sweep.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
