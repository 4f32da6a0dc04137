"""Phase physics of the phantom: tissue HU per phase, emboli, rendering, scanner blur and noise, and the
cross-phase (rigid + breathing) misalignment.

Rendering evaluates the world-coordinate anatomy (``anatomy.py``) at the world points of a grid. For the
NCT the points are the NCT voxel centres; for the CTPA they are ``T(y)`` for every CTPA voxel centre
``y``, where ``T = rigid o nonrigid``. The stored displacement field is ``u(y) = T(y) - y`` (mm, RAS+,
on the CTPA grid): the CTPA voxel at world ``y`` shows the anatomy found at world ``y + u(y)`` in the NCT.
Partial volume comes from soft edges (occupancy ``clip(0.5 - sdf / h, 0, 1)`` with ``h`` the voxel size),
the scanner's point-spread from a Gaussian blur (``blur_sigma_mm``) and noise is spatially correlated
Gaussian noise of standard deviation ``noise_sd_*``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from cpmn.synthetic import anatomy as A
from cpmn.synthetic.anatomy import Anatomy, Segment


@dataclass
class Grid:
    """Voxel grid: ``affine`` (4, 4) RAS+ of voxel (i, j, k), ``shape`` (3,), sample points ``x, y, z``.

    ``margin`` (mm) bounds how far a voxel's sample point may be from its own centre (the displacement).
    """

    affine: np.ndarray
    shape: tuple[int, int, int]
    x: np.ndarray
    y: np.ndarray
    z: np.ndarray
    margin: float = 0.0

    @property
    def spacing(self) -> np.ndarray:
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    def box(self, lo: np.ndarray, hi: np.ndarray) -> tuple[slice, slice, slice] | None:
        """Index slices covering every voxel whose sample point may lie in the world box ``[lo, hi]``."""
        lo = np.asarray(lo) - self.margin
        hi = np.asarray(hi) + self.margin
        corners = np.array([[c[0], c[1], c[2], 1.0] for c in _corners(lo, hi)])
        idx = (np.linalg.inv(self.affine) @ corners.T)[:3]
        i0 = np.floor(idx.min(axis=1)).astype(int)
        i1 = np.ceil(idx.max(axis=1)).astype(int) + 1
        i0 = np.maximum(i0, 0)
        i1 = np.minimum(i1, self.shape)
        if np.any(i1 <= i0):
            return None
        return tuple(slice(int(a), int(b)) for a, b in zip(i0, i1, strict=True))


def _corners(lo, hi):
    return [(x, y, z) for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])]


def voxel_centres(affine: np.ndarray, shape) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """World coordinates (X, Y, Z) float32 each of the voxel centres of a grid."""
    ii, jj, kk = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij")
    m = affine.astype(np.float32)
    return tuple(m[r, 0] * ii + m[r, 1] * jj + m[r, 2] * kk + m[r, 3] for r in range(3))


def make_grid(affine: np.ndarray, shape, displacement: np.ndarray | None = None) -> Grid:
    """A grid whose sample points are its voxel centres, plus ``displacement`` (X, Y, Z, 3) mm if given."""
    x, y, z = voxel_centres(affine, shape)
    margin = 0.0
    if displacement is not None:
        x, y, z = x + displacement[..., 0], y + displacement[..., 1], z + displacement[..., 2]
        margin = float(np.sqrt((displacement**2).sum(-1)).max()) + 1e-3
    return Grid(np.asarray(affine, float), tuple(int(n) for n in shape), x, y, z, margin)


# --------------------------------------------------------------------------------------------------
# phase HU tables and emboli


def sample_phases(rng: np.random.Generator, p: dict) -> dict[str, dict[str, float]]:
    """Tissue HU per phase for one patient (NCT: no contrast; CTPA: pulmonary-arterial timing)."""
    blood = float(rng.uniform(*p["nct_blood_hu"]))
    pa = float(rng.uniform(*p["ctpa_vessel_hu"]))
    common = {
        "air": -1000.0,
        "fat": float(rng.uniform(-110, -90)),
        "lung": float(rng.uniform(-875, -850)),
        "lung_dependent": float(rng.uniform(20, 90)),
        "cortex": float(rng.uniform(700, 950)),
        "marrow": float(rng.uniform(180, 300)),
        "disc": 90.0,
        "cartilage": 120.0,
        "csf": 15.0,
        "airway_wall": 40.0,
    }
    nct = dict(common)
    nct.update(
        muscle=float(rng.uniform(45, 58)),
        liver=float(rng.uniform(50, 65)),
        spleen=float(rng.uniform(42, 52)),
        myocardium=blood + float(rng.uniform(0, 8)),
        oesophagus=40.0,
        pa=blood,
        right=blood,
        left=blood,
        aorta=blood,
        svc=blood,
        vein=blood,
    )
    aorta = pa * float(rng.uniform(0.45, 0.7))
    ctpa = dict(common)
    ctpa.update(
        muscle=nct["muscle"] + 8.0,
        liver=nct["liver"] + float(rng.uniform(15, 35)),
        spleen=nct["spleen"] + float(rng.uniform(40, 80)),
        myocardium=float(rng.uniform(90, 120)),
        oesophagus=45.0,
        pa=pa,
        right=pa,
        left=aorta,
        aorta=aorta,
        svc=min(pa + float(rng.uniform(100, 400)), 1200.0),
        vein=aorta * float(rng.uniform(0.8, 1.0)),
    )
    return {"nct": nct, "ctpa": ctpa}


@dataclass
class Clot:
    """One embolus: a capsule around the axis of artery ``segment`` (world mm), clipped to the lumen."""

    segment: int
    p0: np.ndarray
    p1: np.ndarray
    r: float
    occlusive: bool
    nct_contrast: float
    ctpa_hu: float
    generation: int
    vessel_r: float

    @property
    def centre(self) -> np.ndarray:
        return (self.p0 + self.p1) / 2

    def truth(self) -> dict:
        return {
            "segment": self.segment,
            "centre_mm": [round(float(v), 2) for v in self.centre],
            "ends_mm": [[round(float(v), 2) for v in self.p0], [round(float(v), 2) for v in self.p1]],
            "radius_mm": round(self.r, 2),
            "length_mm": round(float(np.linalg.norm(self.p1 - self.p0)) + 2 * self.r, 2),
            "vessel_radius_mm": round(self.vessel_r, 2),
            "generation": self.generation,
            "location": {1: "central", 2: "lobar", 3: "segmental"}.get(self.generation, "subsegmental"),
            "occlusive": self.occlusive,
            "nct_contrast_hu": round(self.nct_contrast, 2),
            "occult_in_nct": self.nct_contrast == 0.0,
            "ctpa_hu": round(self.ctpa_hu, 2),
        }


def sample_clots(rng: np.random.Generator, an: Anatomy, p: dict, n: int, blood: float) -> list[Clot]:
    """``n`` emboli in central (gen 1), lobar (2) or segmental (3) arteries, partly or fully occlusive.

    ``p`` (the resolved ``synthetic:`` section, :func:`cpmn.synthetic.cohort.resolve_params`):
    ``clot_generation_weights`` (odds of generations 1, 2, 3),
    ``occlusive_fraction``, ``clot_half_length`` (range of the capsule's half length, in vessel radii, at most
    0.4 of the segment), ``nct_occult_fraction``, ``nct_clot_contrast_hu``, ``ctpa_clot_hu``.
    """
    arts = an.arteries
    gw = p["clot_generation_weights"]
    weights = {g: float(w) for g, w in zip((1, 2, 3), gw, strict=True) if w > 0}
    cand = [i for i, sg in enumerate(arts) if sg.gen in weights and np.linalg.norm(sg.p1 - sg.p0) > 2 * sg.r]
    if not cand:
        cand = [i for i, sg in enumerate(arts) if sg.gen >= 1]
    w = np.array([weights.get(arts[i].gen, 0.1) for i in cand])
    clots = []
    for _ in range(n):
        i = int(rng.choice(cand, p=w / w.sum()))
        sg: Segment = arts[i]
        d = sg.p1 - sg.p0
        length = float(np.linalg.norm(d))
        e = d / length
        occl = bool(rng.uniform() < p["occlusive_fraction"])
        half = min(rng.uniform(*p["clot_half_length"]) * sg.r, 0.4 * length)
        t = rng.uniform(0.3, 0.7) * length
        c = sg.p0 + t * e
        if occl:
            r, off = 1.25 * sg.r, np.zeros(3)
        else:
            r = float(rng.uniform(0.45, 0.75)) * sg.r
            perp = A._unit(np.cross(e, rng.normal(size=3)))
            off = perp * rng.uniform(0.0, sg.r - r)  # central ("polo mint") to mural
        occult = rng.uniform() < p["nct_occult_fraction"]
        contrast = 0.0 if occult else float(rng.uniform(*p["nct_clot_contrast_hu"]))
        clots.append(
            Clot(
                segment=i,
                p0=c + off - half * e,
                p1=c + off + half * e,
                r=float(r),
                occlusive=occl,
                nct_contrast=contrast,
                ctpa_hu=float(rng.uniform(*p["ctpa_clot_hu"])),
                generation=sg.gen,
                vessel_r=sg.r,
            )
        )
    return clots


def sample_mimics(rng: np.random.Generator, an: Anatomy) -> list[dict]:
    """Non-embolic look-alikes, drawn with the same odds for every patient (so they say nothing about PE)."""
    mimics = []
    s = an.s
    lung_pts = []
    for sg in an.arteries:
        if sg.gen >= 4:
            lung_pts.append(sg.p1)
    if lung_pts and rng.uniform() < 0.5:  # calcified granuloma next to a small artery
        q = lung_pts[int(rng.integers(len(lung_pts)))] + rng.normal(0, 6 * s, 3)
        mimics.append(
            {"kind": "calcified_granuloma", "centre_mm": q.tolist(), "radius_mm": 2.5 * s, "hu": 400.0}
        )
    if rng.uniform() < 0.5:  # hyperdense lymph node beside a hilar artery (looks like a hyperdense clot)
        sg = an.arteries[int(rng.choice([1, 2, 3]))]
        q = (sg.p0 + sg.p1) / 2 + A._unit(np.cross(sg.p1 - sg.p0, [0, 0, 1.0])) * (sg.r + 5 * s)
        mimics.append(
            {"kind": "hyperdense_node", "centre_mm": q.tolist(), "radius_mm": 5.0 * s, "hu_above_blood": 20.0}
        )
    return mimics


# --------------------------------------------------------------------------------------------------
# rendering


def _paint(hu: np.ndarray, alpha: np.ndarray, value, sl=None) -> None:
    if sl is None:
        hu += alpha * (value - hu)
    else:
        sub = hu[sl]
        sub += alpha * (value - sub)


def _seg_bbox(sg: Segment, pad: float) -> tuple[np.ndarray, np.ndarray]:
    lo = np.minimum(sg.p0, sg.p1) - sg.r - pad
    hi = np.maximum(sg.p0, sg.p1) + sg.r + pad
    return lo, hi


def tree_sdf(grid: Grid, segs: list[Segment], h: float, dilate: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Signed distance (mm, capped at 2h) to a union of capsules dilated by ``dilate``, and the nearest one.

    Each capsule is rasterised within its bounding box only. Returns (X, Y, Z) float32 and int32 (-1 far).
    """
    sdf = np.full(grid.shape, 2 * h, dtype=np.float32)
    owner = np.full(grid.shape, -1, dtype=np.int32)
    for n, sg in enumerate(segs):
        sl = grid.box(*_seg_bbox(sg, 2 * h + dilate))
        if sl is None:
            continue
        d = A.segment_distance(grid.x[sl], grid.y[sl], grid.z[sl], sg.p0, sg.p1) - (sg.r + dilate)
        sub, own = sdf[sl], owner[sl]
        closer = d < sub
        sub[closer] = d[closer]
        own[closer] = n
    return sdf, owner


def render(
    an: Anatomy,
    grid: Grid,
    hu_table: dict[str, float],
    clots: list[Clot],
    clot_hu: list[float],
    texture: TextureField,
    mimics: list[dict],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Noise-free, unblurred HU of one phase on ``grid`` and the hard labels.

    Only the bounding box of the body is rendered; the rest of the grid is air.

    Returns:
        hu: (X, Y, Z) float32 HU with partial-volume edges.
        lumen: (X, Y, Z) bool, voxel centre (sample point) inside the pulmonary-arterial lumen.
        clot: (X, Y, Z) uint8, 1 where the sample point lies in an embolus (always inside ``lumen``).
    """
    h = float(np.max(grid.spacing))
    lo = np.array([an.cx - 1.1 * an.a - h, an.cy - 1.05 * an.b - h, -np.inf])
    hi = np.array([an.cx + 1.1 * an.a + h, an.cy + 1.05 * an.b + h, np.inf])
    sl = grid.box(np.where(np.isinf(lo), -1e6, lo), np.where(np.isinf(hi), 1e6, hi))
    hu = np.full(grid.shape, hu_table["air"], dtype=np.float32)
    lumen = np.zeros(grid.shape, dtype=bool)
    clot = np.zeros(grid.shape, dtype=np.uint8)
    if sl is None:
        return hu, lumen, clot
    shift = np.eye(4)
    shift[:3, 3] = [s_.start for s_ in sl]
    sub = Grid(
        grid.affine @ shift,
        tuple(s_.stop - s_.start for s_ in sl),
        grid.x[sl],
        grid.y[sl],
        grid.z[sl],
        grid.margin,
    )
    hu[sl], lumen[sl], clot[sl] = _render(an, sub, hu_table, clots, clot_hu, texture, mimics)
    return hu, lumen, clot


def _render(
    an: Anatomy,
    grid: Grid,
    hu_table: dict[str, float],
    clots: list[Clot],
    clot_hu: list[float],
    texture: TextureField,
    mimics: list[dict],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Noise-free, unblurred HU of one phase on ``grid`` and the hard labels.

    Returns:
        hu: (X, Y, Z) float32 HU with partial-volume edges.
        lumen: (X, Y, Z) bool, voxel centre (sample point) inside the pulmonary-arterial lumen.
        clot: (X, Y, Z) uint8, 1 where the sample point lies in an embolus (always inside ``lumen``).
    """
    h = float(np.mean(grid.spacing))
    x, y, z = grid.x, grid.y, grid.z
    s = an.s
    t = hu_table
    fine, coarse = texture.sample(grid)
    hu = np.full(grid.shape, t["air"], dtype=np.float32)
    body = A.body_sdf(an, x, y, z)
    _paint(hu, A.soft(body, h), t["fat"] + 6 * fine)
    # muscle layer inside the subcutaneous fat (thicker posteriorly: paraspinal muscles)
    muscle = body + an.t_fat * (1 + 0.4 * np.clip((an.cy - y) / an.b, 0, 1))
    muscle = np.minimum(muscle, A.ellipse_sdf(x - an.cx, y - (an.yv - 40 * s), 42 * s, 36 * s))
    muscle = np.maximum(muscle, body + 0.6 * an.t_fat)
    _paint(hu, A.soft(muscle, h), t["muscle"] + 6 * fine)
    cav = A.cavity_sdf(an, x, y, z)
    _paint(hu, A.soft(cav, h), t["fat"] + 6 * fine)
    # below the diaphragm: liver (right), spleen (left)
    dz = A.diaphragm_z(an, x, y) - z
    below = np.maximum(cav + 2 * s, -dz)
    _paint(
        hu, A.soft(below, h), np.where(x > an.cx, np.float32(t["liver"]), np.float32(t["spleen"])) + 5 * fine
    )
    # lungs: parenchymal texture and a dependent (posterior) density gradient
    caps = np.full(grid.shape, 2 * h, dtype=np.float32)
    for segs, margin in A.mediastinal_capsules(an):
        np.minimum(caps, tree_sdf(grid, segs, h, margin)[0], out=caps)
    heart = A.heart_sdf(an, x, y, z)
    lung = A.lung_sdf(an, x, y, z, caps, heart)
    dep = np.clip((an.cy + 0.2 * an.bc - y) / (1.2 * an.bc), 0, 1) ** 2
    lung_hu = t["lung"] + t["lung_dependent"] * dep + 22 * fine + 14 * coarse
    lung_a = A.soft(lung, h)
    _paint(hu, lung_a, lung_hu)
    # peripheral micro-vessels below the trees' resolution: sparse small blobs of the smooth texture
    micro = np.clip((fine - 2.0) / 0.8, 0, 1) * lung_a
    _paint(hu, 0.7 * micro, t["vein"])
    # ribs: tubes just outside the cavity, descending anteriorly, interrupted by costal cartilage
    ex, ey = (x - an.cx) / an.ac, (y - an.cy - 0.04 * an.bc) / an.bc
    q = np.sqrt(ex * ex + ey * ey)
    th = np.arctan2(ey, ex)
    reff = np.sqrt((an.ac * np.cos(th)) ** 2 + (an.bc * np.sin(th)) ** 2)
    dr = (q - 1) * reff - 6 * s
    zc = an.rib_phase - an.rib_drop * (1 + np.sin(th)) / 2
    dzr = (z - zc) - an.rib_spacing * np.round((z - zc) / an.rib_spacing)
    rib = (np.sqrt((dr / (4.0 * s)) ** 2 + (dzr / (5.0 * s)) ** 2) - 1) * 4.0 * s
    rib = np.maximum(rib, -(np.abs(th + np.pi / 2) - 0.32))  # none over the spine
    front = np.abs(th - np.pi / 2) < 0.38
    rib_a = A.soft(rib, h)
    _paint(hu, rib_a * front, t["cartilage"])
    rib_a = rib_a * ~front
    _paint(hu, rib_a, t["cortex"])
    _paint(hu, A.soft(rib + 1.5 * s, h) * ~front, t["marrow"])
    # sternum
    st = np.maximum(np.abs(x - an.cx) - 14 * s, np.abs(y - (an.cy + an.bc + 5 * s)) - 5 * s)
    st = np.maximum(st, -(z + 0.8 * an.hz))
    _paint(hu, A.soft(st, h), t["cortex"])
    _paint(hu, A.soft(st + 2 * s, h), t["marrow"])
    # vertebrae: body with discs, canal, posterior arch and spinous process
    vb = A.ellipse_sdf(x - an.cx, y - an.yv, an.rv_x, an.rv_y)
    dzv = (z - an.vert_phase) - an.vert_height * np.round((z - an.vert_phase) / an.vert_height)
    disc = np.abs(dzv) < 2.5 * s
    yc = an.yv - an.rv_y - 10 * s
    arch = A.ellipse_sdf(x - an.cx, y - yc, 13 * s, 11 * s)  # pedicles and laminae around the canal
    # spinous process: tapering posteriorly, one per vertebra
    tip = np.clip((yc - 8 * s - y) / (20 * s), 0, 1)
    spin = np.maximum(np.abs(x - an.cx) - s * (4.0 - 2.0 * tip), np.abs(y - (yc - 17 * s)) - 10 * s)
    spin = np.maximum(spin, np.abs(dzv) - 0.3 * an.vert_height)
    arch = np.minimum(arch, spin)
    for sgn in (-1.0, 1.0):  # transverse processes, pointing postero-laterally
        arch = np.minimum(arch, A.ellipse_sdf(x - (an.cx + sgn * 21 * s), y - (yc - 3 * s), 10 * s, 4.5 * s))
    bone = np.minimum(vb, arch)
    _paint(hu, A.soft(bone, h), t["cortex"])
    _paint(hu, A.soft(vb + 2 * s, h), np.where(disc, np.float32(t["disc"]), np.float32(t["marrow"])))
    _paint(hu, A.soft(arch + 2 * s, h), t["marrow"])
    _paint(hu, A.soft(A.ellipse_sdf(x - an.cx, y - yc, 8 * s, 7 * s), h), t["csf"])
    # mediastinum: oesophagus, airway, heart and chambers, great vessels
    _paint(hu, A.soft(_local_sdf(grid, an.esophagus, h), h), t["oesophagus"])
    aw = _local_sdf(grid, an.airway, h)
    _paint(hu, A.soft(aw, h), t["airway_wall"])
    _paint(hu, A.soft(aw + 2 * s, h), t["air"])
    _paint(hu, A.soft(heart - 3 * s, h), t["fat"])
    _paint(hu, A.soft(heart, h), t["myocardium"] + 3 * fine)
    for name, key in (("RV", "right"), ("RA", "right"), ("LV", "left"), ("LA", "left")):
        cs = np.maximum(A.chamber_sdf(an, name, x, y, z), heart + 3 * s)
        if name == "LA":
            cs = A.chamber_sdf(an, name, x, y, z)
        _paint(hu, A.soft(cs, h), t[key])
    _paint(hu, A.soft(_local_sdf(grid, an.aorta, h), h), t["aorta"])
    _paint(hu, A.soft(_local_sdf(grid, an.svc, h), h), t["svc"])
    vsdf, _ = tree_sdf(grid, an.veins, h)
    _paint(hu, A.soft(vsdf, h), t["vein"] + 2 * fine)
    asdf, owner = tree_sdf(grid, an.arteries, h)
    va = A.soft(asdf, h)
    _paint(hu, va, t["pa"] + 2 * fine)
    lumen = asdf < 0
    clot = np.zeros(grid.shape, dtype=np.uint8)
    for c, chu in zip(clots, clot_hu, strict=True):
        lo = np.minimum(c.p0, c.p1) - c.r - 2 * h
        hi = np.maximum(c.p0, c.p1) + c.r + 2 * h
        sl = grid.box(lo, hi)
        if sl is None:
            continue
        csdf = A.segment_distance(grid.x[sl], grid.y[sl], grid.z[sl], c.p0, c.p1) - c.r
        alpha = np.minimum(A.soft(csdf, h), va[sl])
        _paint(hu, alpha, chu, sl)
        clot[sl] |= ((csdf < 0) & lumen[sl]).astype(np.uint8)
    for m in mimics:
        cen = np.asarray(m["centre_mm"])
        r = m["radius_mm"]
        sl = grid.box(cen - r - 2 * h, cen + r + 2 * h)
        if sl is None:
            continue
        d = np.sqrt((grid.x[sl] - cen[0]) ** 2 + (grid.y[sl] - cen[1]) ** 2 + (grid.z[sl] - cen[2]) ** 2) - r
        if "hu" in m:
            val = m["hu"]
        elif t["pa"] > 150:  # contrast phase: an ordinary soft-tissue node
            val = t["myocardium"] - 10.0
        else:  # NCT: slightly hyperdense, like a clot
            val = t["pa"] + m["hu_above_blood"]
        _paint(hu, A.soft(d, h), val, sl)
    return hu, lumen, clot


def _local_sdf(grid: Grid, segs: list[Segment], h: float) -> np.ndarray:
    return tree_sdf(grid, segs, h)[0]


class TextureField:
    """World-anchored smooth random fields (unit SD): ``fine`` (~1 voxel) and ``coarse`` (~4 voxels).

    They live on a lattice equal to the NCT grid padded by ``pad`` voxels, so that the NCT reads them by
    slicing and the CTPA (sample points moved by the misalignment) by trilinear interpolation.
    """

    def __init__(self, rng: np.random.Generator, affine: np.ndarray, shape, pad: int = 6):
        self.affine = np.asarray(affine, float)
        self.shape = tuple(int(n) for n in shape)
        self.pad = pad
        big = tuple(n + 2 * pad for n in self.shape)
        f = ndimage.gaussian_filter(rng.standard_normal(big, dtype=np.float32), 0.9)
        self.fine = f / max(float(f.std()), 1e-6)
        c = ndimage.gaussian_filter(rng.standard_normal(big, dtype=np.float32), 3.0, truncate=2.5)
        self.coarse = c / max(float(c.std()), 1e-6)

    def sample(self, grid: Grid) -> tuple[np.ndarray, np.ndarray]:
        p = self.pad
        off = (np.linalg.inv(self.affine) @ grid.affine[:, 3])[:3]
        if (
            grid.margin == 0
            and np.allclose(grid.affine[:3, :3], self.affine[:3, :3])
            and np.allclose(off, np.rint(off))
        ):
            o = np.rint(off).astype(int) + p
            if np.all(o >= 0) and np.all(o + np.array(grid.shape) <= np.array(self.fine.shape)):
                sl = tuple(slice(int(a), int(a) + n) for a, n in zip(o, grid.shape, strict=True))
                return self.fine[sl], self.coarse[sl]
        inv = np.linalg.inv(self.affine).astype(np.float32)
        coords = [
            inv[r, 0] * grid.x + inv[r, 1] * grid.y + inv[r, 2] * grid.z + inv[r, 3] + p for r in range(3)
        ]
        coords = np.stack(coords)
        return (
            ndimage.map_coordinates(self.fine, coords, order=1, mode="nearest"),
            ndimage.map_coordinates(self.coarse, coords, order=1, mode="nearest"),
        )


def scanner(
    hu: np.ndarray, spacing, blur_sigma_mm: float, noise_sd: float, rng: np.random.Generator
) -> np.ndarray:
    """Gaussian point-spread (sigma in mm) plus correlated noise of SD ``noise_sd`` HU, rounded to int16."""
    out = hu
    if blur_sigma_mm > 0:
        out = ndimage.gaussian_filter(hu, [blur_sigma_mm / float(sp) for sp in spacing], mode="nearest")
    if noise_sd > 0:
        n = ndimage.gaussian_filter(rng.standard_normal(hu.shape, dtype=np.float32), 0.6)
        out = out + n * (noise_sd / max(float(n.std()), 1e-6))
    return np.clip(np.rint(out), -1024, 3071).astype(np.int16)


# --------------------------------------------------------------------------------------------------
# cross-phase misalignment


def _rotation(angles_rad: np.ndarray) -> np.ndarray:
    ax, ay, az = angles_rad
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def smooth_field(rng: np.random.Generator, shape, terms: int = 6, max_cycles: float = 1.0) -> np.ndarray:
    """A smooth random field (X, Y, Z) float32 scaled to max |f| = 1: a sum of separable cosine products
    with at most ``max_cycles`` periods across the grid."""
    out = np.zeros(shape, dtype=np.float32)
    axes = [np.arange(n, dtype=np.float32) / max(n - 1, 1) for n in shape]
    for _ in range(terms):
        g = [
            np.cos(2 * np.pi * rng.uniform(0, max_cycles) * ax + rng.uniform(0, 2 * np.pi)).astype(np.float32)
            for ax in axes
        ]
        out += float(rng.normal()) * (g[0][:, None, None] * g[1][None, :, None] * g[2][None, None, :])
    return out / max(float(np.abs(out).max()), 1e-6)


def _displacement(pts, centre, angles, trans, nr):
    """``T(y) - y`` per component for points ``pts`` and non-rigid displacement ``nr`` (3 arrays each)."""
    rot = _rotation(angles)
    q = [pts[c] + nr[c] - float(centre[c]) for c in range(3)]
    return [
        rot[r, 0] * q[0] + rot[r, 1] * q[1] + rot[r, 2] * q[2] + float(centre[r] + trans[r]) - pts[r]
        for r in range(3)
    ]


def _norm(u) -> float:
    return float(np.sqrt(u[0] * u[0] + u[1] * u[1] + u[2] * u[2]).max())


def misalignment(
    rng: np.random.Generator, affine: np.ndarray, shape, max_mm: float, hz: float
) -> tuple[np.ndarray, dict]:
    """Displacement ``u(y) = T(y) - y`` (X, Y, Z, 3) float32 mm on the CTPA grid, ``T = rigid o nonrigid``.

    The non-rigid part is a breathing motion (mostly cranio-caudal, growing towards the lung bases) plus a
    low-frequency random field; the rigid part is a small rotation about the grid centre and a translation.
    All amplitudes are scaled together so that ``max |u|`` over the grid is a random fraction in [0.5, 1]
    of ``max_mm`` (and never above it).
    """
    shape = tuple(int(n) for n in shape)
    pts = voxel_centres(affine, shape)
    centre = (affine @ np.array([(n - 1) / 2 for n in shape] + [1.0]))[:3]
    angles = rng.uniform(-1, 1, 3) * np.deg2rad([1.5, 1.5, 2.0])
    trans = rng.uniform(-1, 1, 3) * np.array([2.0, 2.0, 3.0])
    breath = np.array([0.0, rng.uniform(-1, 1) * 2.0, rng.uniform(-1, 1) * 6.0])
    rnd = [smooth_field(rng, shape) for _ in range(3)]
    w = np.clip((0.6 * hz - pts[2]) / (1.6 * hz), 0, 1)
    w = w * np.sqrt(w)  # 0 at the top, 1 at the bases
    nonrigid = [float(breath[c]) * w + 1.2 * rnd[c] for c in range(3)]
    target = float(rng.uniform(0.5, 1.0)) * max_mm
    info = {"target_max_mm": round(target, 4)}
    sub = np.ix_(*(np.unique(np.r_[np.arange(0, n, 3), n - 1]) for n in shape))
    k = 1.0
    for _ in range(8):
        if max_mm <= 0:
            break
        u = _displacement(
            [p[sub] for p in pts], centre, angles * k, trans * k, [f[sub] * k for f in nonrigid]
        )
        m = _norm(u)
        if m == 0 or abs(m - target) < 1e-4 * max_mm:
            break
        k *= target / m
    if max_mm <= 0:
        k = 0.0
    u = _displacement(pts, centre, angles * k, trans * k, [f * k for f in nonrigid])
    u = np.stack(u, -1).astype(np.float32)
    m = float(np.sqrt((u**2).sum(-1)).max())
    if m > max_mm and m > 0:
        u *= max_mm / m * (1 - 1e-6)
    info.update(
        rotation_deg=[round(float(v), 4) for v in np.rad2deg(angles * k)],
        translation_mm=[round(float(v), 4) for v in trans * k],
        breathing_ap_mm=round(float(breath[1] * k), 4),
        breathing_si_mm=round(float(breath[2] * k), 4),
        random_field_mm=round(1.2 * k, 4),
        rotation_centre_mm=[round(float(v), 3) for v in centre],
        max_displacement_mm=round(float(np.sqrt((u**2).sum(-1)).max()), 4),
    )
    return u, info
