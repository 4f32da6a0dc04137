"""Benchmark: seconds per patient for CTPA -> NCT registration (cpmn.data.register.register_patient).

Usage: ``.venv/bin/python benchmarks/register.py [--threads N] [--native] [--sizes default,chest]``

Two synthetic chest-like pairs with a known misalignment (``tests/registration_pair.py``: 8 mm
shift, 4 deg rotation, 2.5 mm smooth warp) are made in the script:

* ``default``: 100 x 100 x 64 at 3.2 mm (the default phantom cohort's NCT grid),
* ``chest``: 256 x 256 x 200 at 1.5 mm (a clinical chest CT after light downsampling).

Each is registered with the default ``register`` config (registration copies at ``reg_spacing`` = 4 mm;
``--native`` also runs the chest volume at its native 1.5 mm) and a table of seconds, registration grid,
NCC before/after and Dice of the warped clot mask is printed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib

from cpmn.data.register import DEFAULTS, dice, register_patient

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from registration_pair import synthetic_pair  # noqa: E402  (the tests' fixture)

SIZES = {"default": ((100, 100, 64), 3.2), "chest": ((256, 256, 200), 1.5)}


def bench(name: str, shape, spacing: float, params: dict, threads: int | None, tmp: Path) -> dict:
    pair = synthetic_pair(shape, spacing, shift_mm=(8.0, -6.0, 4.0), clot_radius_mm=(9.0, 7.0), seed=0)
    paths = {}
    for key in ("nct", "ctpa", "nct_mask", "ctpa_mask"):
        paths[key] = tmp / f"{name}_{key}.nii.gz"
        nib.save(nib.Nifti1Image(pair[key], pair["affine"]), paths[key])
    t0 = time.perf_counter()
    qc = register_patient(
        paths["nct"], paths["ctpa"], paths["ctpa_mask"], tmp / name, name, params,
        truth_mask=paths["nct_mask"], threads=threads,
    )  # fmt: skip
    qc["wall"] = time.perf_counter() - t0
    qc["dice_before"] = dice(pair["ctpa_mask"], pair["nct_mask"])
    return qc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--native", action="store_true", help="also register the chest volume at native spacing")
    ap.add_argument("--sizes", default="default,chest")
    args = ap.parse_args(argv)
    runs = []
    for name in args.sizes.split(","):
        shape, sp = SIZES[name]
        runs.append((name, shape, sp, dict(DEFAULTS)))
        if args.native and name == "chest":
            runs.append((f"{name}-native", shape, sp, dict(DEFAULTS, reg_spacing=None)))
    print(
        f"threads={args.threads}  transform={DEFAULTS['type_of_transform']}  "
        f"iterations={DEFAULTS['reg_iterations']}"
    )
    header = f"{'case':<14} {'shape':<13} {'mm':>4} {'reg grid mm':>11} {'seconds':>8} {'NCC before':>10} "
    header += f"{'NCC after':>9} {'Dice before':>11} {'Dice after':>10} {'jac_min':>7}"
    print(header)
    with tempfile.TemporaryDirectory() as tmp:
        for name, shape, sp, params in runs:
            qc = bench(name, shape, sp, params, args.threads, Path(tmp))
            print(
                f"{name:<14} {'x'.join(map(str, shape)):<13} {sp:>4} {qc['reg_spacing'][0]:>11.2f} "
                f"{qc['wall']:>8.1f} {qc['ncc_before']:>10.3f} {qc['ncc_after']:>9.3f} "
                f"{qc['dice_before']:>11.3f} {qc['dice_truth']:>10.3f} {qc['jac_min']:>7.3f}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
