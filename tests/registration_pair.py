"""A synthetic chest-like NCT/CTPA pair with a known misalignment: the registration tests' and benchmark's
fixture (test-only, so it lives here and not in the package)."""

from __future__ import annotations

import numpy as np


def synthetic_pair(
    shape: tuple[int, int, int] = (48, 48, 48),
    spacing: float = 4.0,
    shift_mm: tuple[float, float, float] = (5.0, -4.0, 3.0),
    rot_deg: float = 4.0,
    warp_mm: float = 2.5,
    clot_radius_mm: tuple[float, float] = (9.0, 7.0),
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """A synthetic chest-like NCT/CTPA pair with a known misalignment (for tests and benchmarks).

    The anatomy (body ellipsoid with texture, two lungs, spine, a heart and vessels that enhance only in
    CTPA, two spherical "clots" in the vessels) is an analytic function of world position (mm, centred on
    the volume). The NCT samples it on its grid at ``x``; the CTPA on the same grid at ``phi(x) = R x + t +
    d(x)`` (rotation about z by ``rot_deg``, shift ``shift_mm``, smooth sinusoidal displacement of amplitude
    ``warp_mm``), i.e. the CTPA is the anatomy moved by ``phi^-1``. Returns ``nct``, ``ctpa`` (float32 HU),
    ``ctpa_mask`` (uint8, clots in CTPA space), ``nct_mask`` (uint8, the true clots on the NCT grid) all of
    ``shape``, and ``affine`` (4x4 RAS affine shared by both grids).
    """
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in shape)
    extent = np.array(shape, dtype=np.float64) * spacing
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), axis=-1)
    x = (grid + 0.5) * spacing - extent / 2.0  # world mm, (X, Y, Z, 3)
    freqs = rng.normal(0.0, 2 * np.pi / 40.0, size=(6, 3))
    phases = rng.uniform(0, 2 * np.pi, size=6)

    def anatomy(pts: np.ndarray, contrast: bool) -> tuple[np.ndarray, np.ndarray]:
        u = pts / (extent / 2.0)
        hu = np.full(pts.shape[:-1], -1000.0)
        texture = sum(np.sin(pts @ f + ph) for f, ph in zip(freqs, phases, strict=True)) * 12.0
        body = (u[..., 0] / 0.85) ** 2 + (u[..., 1] / 0.65) ** 2 + (u[..., 2] / 0.95) ** 2 < 1
        hu[body] = 40.0 + texture[body]
        for sx in (-0.4, 0.4):
            lung = ((u[..., 0] - sx) / 0.3) ** 2 + ((u[..., 1] + 0.05) / 0.42) ** 2 + (
                u[..., 2] / 0.75
            ) ** 2 < 1
            hu[lung] = -850.0 + 0.5 * texture[lung]
        spine = ((u[..., 0] / 0.1) ** 2 + ((u[..., 1] - 0.5) / 0.1) ** 2 < 1) & body
        hu[spine] = 700.0
        heart = ((u[..., 0] + 0.02) / 0.22) ** 2 + ((u[..., 1] + 0.2) / 0.2) ** 2 + (
            (u[..., 2] + 0.3) / 0.3
        ) ** 2 < 1
        blood = 400.0 if contrast else 45.0
        hu[heart] = blood
        clot = np.zeros(pts.shape[:-1], dtype=bool)
        for sx, r_clot, zc in ((-0.22, clot_radius_mm[0], 0.2), (0.22, clot_radius_mm[1], -0.15)):
            vessel = ((u[..., 0] - sx) / 0.06) ** 2 + ((u[..., 1] + 0.1) / 0.06) ** 2 < 1
            vessel &= np.abs(u[..., 2]) < 0.6
            hu[vessel] = blood
            c = np.array([sx, -0.1, zc]) * extent / 2.0
            clot |= np.linalg.norm(pts - c, axis=-1) < r_clot
        hu[clot] = 55.0 if contrast else 60.0
        return hu, clot

    th = np.deg2rad(rot_deg)
    rot = np.array([[np.cos(th), -np.sin(th), 0], [np.sin(th), np.cos(th), 0], [0, 0, 1]])
    disp = np.stack(
        [warp_mm * np.sin(2 * np.pi * x[..., (i + 1) % 3] / extent[(i + 1) % 3] + i) for i in range(3)],
        axis=-1,
    )
    phi = x @ rot.T + np.asarray(shift_mm) + disp
    nct, nct_mask = anatomy(x, contrast=False)
    ctpa, ctpa_mask = anatomy(phi, contrast=True)
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = -extent / 2.0 + spacing / 2.0
    return {
        "nct": nct.astype(np.float32),
        "ctpa": ctpa.astype(np.float32),
        "nct_mask": nct_mask.astype(np.uint8),
        "ctpa_mask": ctpa_mask.astype(np.uint8),
        "affine": affine,
    }
