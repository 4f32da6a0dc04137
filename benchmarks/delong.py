"""Benchmark: the fast DeLong test (cpmn.stats.delong_test) on 10^6 scores must take < 1 s.

Usage: ``.venv/bin/python benchmarks/delong.py [N]`` (N = 1000000 by default); prints the time.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from cpmn.stats import delong_ci, delong_test


def main(n: int = 1_000_000) -> int:
    rng = np.random.default_rng(0)
    y = (rng.random(n) < 0.3).astype(int)
    a = rng.normal(size=n) + 1.0 * y
    b = np.round(rng.normal(size=n) + 0.8 * y, 2)  # rounded: many ties
    t0 = time.perf_counter()
    res = delong_test(y, a, b)
    t_test = time.perf_counter() - t0
    t0 = time.perf_counter()
    ci = delong_ci(y, a)
    t_ci = time.perf_counter() - t0
    print(
        f"delong_test on {n} scores x 2: {t_test:.3f} s (auc_a {res.auc_a:.4f}, auc_b {res.auc_b:.4f}, "
        f"z {res.z:.2f})"
    )
    print(f"delong_ci   on {n} scores:     {t_ci:.3f} s (auc {ci.auc:.4f}, ci {ci.ci[0]:.4f}-{ci.ci[1]:.4f})")
    ok = t_test < 1.0
    print("PASS" if ok else "FAIL", "(limit 1 s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000))
