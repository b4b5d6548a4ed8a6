"""Print the markdown table of `cargo bench --bench pack` from criterion's estimates.

Usage: python benches/pack_table.py [codes]   (codes: GSRQ_BENCH_CODES, default 16 Mi)
GB/s = bytes of uint16 codes (2 per code) / median time; memcpy copies the same bytes.
"""

import json
import sys
from pathlib import Path

n = int(sys.argv[1]) if len(sys.argv) > 1 else 16 << 20
root = Path(__file__).resolve().parent.parent / "target" / "criterion"
print("| bits | pack GB/s | unpack GB/s | memcpy GB/s | pack / memcpy | unpack / memcpy |")
print("|---:|---:|---:|---:|---:|---:|")
for b in (1, 4, 8, 10, 12, 16):
    gbs = {}
    for f in ("pack", "unpack", "memcpy"):
        est = json.loads((root / f"{b}-bit" / f / "new" / "estimates.json").read_text())
        gbs[f] = 2 * n / (est["median"]["point_estimate"] * 1e-9) / 1e9
    print(
        f"| {b} | {gbs['pack']:.2f} | {gbs['unpack']:.2f} | {gbs['memcpy']:.2f} "
        f"| {gbs['pack'] / gbs['memcpy']:.2f} | {gbs['unpack'] / gbs['memcpy']:.2f} |"
    )
