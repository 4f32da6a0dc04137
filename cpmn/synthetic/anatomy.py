"""Chest anatomy of the phantom, defined as functions of world coordinates (RAS+, mm).

The anatomy of one patient is a :class:`Anatomy`: a handful of analytic shapes (body, fat and muscle
layers, thoracic cavity, ribs, sternum, vertebrae, heart and chambers, aorta, superior vena cava,
trachea and main bronchi, oesophagus, diaphragm domes with liver and spleen below) plus two vascular
trees made of capsule segments: the pulmonary arteries (trunk -> left/right pulmonary artery -> a
recursive tree of lobar, segmental and subsegmental branches in each lung) and the pulmonary veins.

The recursive trees are grown by *territory bisection*: each lung is represented by a cloud of points
inside its mask; a branch runs from its parent's end part of the way towards the centroid of its
territory, the territory is split in two by a plane through the centroid (normal = its principal axis,
jittered), and the children's radii follow a generalised Murray's law ``r_parent^g = r_1^g + r_2^g``
with the flow shared in proportion to the territory sizes. Branches are clipped to stay inside the lung.

Because every shape is a signed distance (negative inside, mm) of world points, the same anatomy can be
rendered on the NCT grid and, through the cross-phase transform, on the CTPA grid (see ``physics.py``).
Arrays of points are given as three float32 arrays ``x, y, z`` of a common shape (e.g. ``(X, Y, Z)``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

#: index of the pulmonary trunk, left and right pulmonary arteries in ``Anatomy.arteries``
TRUNK, RPA, LPA = 0, 1, 2


@dataclass
class Segment:
    """A capsule: the points within ``r`` mm of the line segment ``p0 -> p1`` (world mm)."""

    p0: np.ndarray  # (3,)
    p1: np.ndarray  # (3,)
    r: float
    gen: int  # 0 trunk, 1 main (left/right) pulmonary artery, 2 lobar, 3 segmental, 4+ subsegmental
    side: str  # "R", "L" or "C" (central)
    parent: int = -1


@dataclass
class Anatomy:
    """The per-patient anatomy; all lengths in mm, positions in world RAS+ coordinates.

    ``s`` scales every length (1.0 for a 320 mm field of view); ``hz`` is half the z extent of the
    NCT field of view. ``cx, cy`` is the body centre in the axial plane.
    """

    s: float
    hz: float
    cx: float
    cy: float
    a: float  # body semi-axis, left-right
    b: float  # body semi-axis, antero-posterior
    t_fat: float
    t_muscle: float
    ac: float  # thoracic cavity semi-axes
    bc: float
    yv: float  # vertebral body centre (y)
    rv_x: float  # vertebral body radii
    rv_y: float
    rib_spacing: float
    rib_phase: float
    rib_drop: float
    vert_height: float
    vert_phase: float
    z_dome_r: float
    z_dome_l: float
    heart_c: np.ndarray
    heart_ax: np.ndarray  # semi-axes (3,)
    heart_rot: float  # rotation about z (rad)
    chambers: dict[str, tuple[np.ndarray, float]]
    aorta: list[Segment]
    svc: list[Segment]
    airway: list[Segment]
    esophagus: list[Segment]
    arteries: list[Segment]
    veins: list[Segment]
    mimics: list[dict] = field(default_factory=list)
    _lattice: object = field(default=None, repr=False)

    def summary(self) -> dict:
        """JSON-friendly description (for truth.json)."""
        gens = [seg.gen for seg in self.arteries]
        return {
            "scale": round(self.s, 4),
            "body_semi_axes_mm": [round(self.a, 2), round(self.b, 2)],
            "body_centre_mm": [round(self.cx, 2), round(self.cy, 2)],
            "artery_segments": len(self.arteries),
            "artery_generations": int(max(gens)),
            "artery_segments_per_generation": {str(g): gens.count(g) for g in sorted(set(gens))},
            "vein_segments": len(self.veins),
            "mimics": self.mimics,
        }


# --------------------------------------------------------------------------------------------------
# signed distances


def soft(sdf: np.ndarray, h: float) -> np.ndarray:
    """Partial-volume occupancy in [0, 1] of a shape with signed distance ``sdf`` for voxels of size ``h``."""
    return np.clip(0.5 - sdf / h, 0.0, 1.0)


def ellipse_sdf(x: np.ndarray, y: np.ndarray, a: float, b: float) -> np.ndarray:
    """Approximate signed distance (mm) to the axis-aligned ellipse with semi-axes ``a, b`` at the origin."""
    q = np.sqrt((x / a) ** 2 + (y / b) ** 2)
    r = np.sqrt(x * x + y * y)
    return (q - 1.0) * r / np.maximum(q, 1e-6)


def ellipsoid_sdf(x, y, z, ax: np.ndarray) -> np.ndarray:
    """Approximate signed distance (mm) to the origin-centred ellipsoid with semi-axes ``ax`` (3,)."""
    q = np.sqrt((x / ax[0]) ** 2 + (y / ax[1]) ** 2 + (z / ax[2]) ** 2)
    r = np.sqrt(x * x + y * y + z * z)
    return (q - 1.0) * r / np.maximum(q, 1e-6)


def segment_distance(x, y, z, p0: np.ndarray, p1: np.ndarray) -> np.ndarray:
    """Euclidean distance (mm) of points to the line segment ``p0 -> p1``."""
    d = p1 - p0
    dd = float(d @ d) or 1e-9
    t = np.clip(((x - p0[0]) * d[0] + (y - p0[1]) * d[1] + (z - p0[2]) * d[2]) / dd, 0.0, 1.0)
    return np.sqrt((x - p0[0] - t * d[0]) ** 2 + (y - p0[1] - t * d[1]) ** 2 + (z - p0[2] - t * d[2]) ** 2)


def capsules_sdf(x, y, z, segs: list[Segment]) -> np.ndarray:
    """Signed distance (mm) to the union of capsules, evaluated on every point (small lists only)."""
    out = np.full(np.shape(x), 1e4, dtype=np.float32)
    for seg in segs:
        np.minimum(out, segment_distance(x, y, z, seg.p0, seg.p1) - seg.r, out=out)
    return out


# --------------------------------------------------------------------------------------------------
# the anatomy's shapes


def body_sdf(an: Anatomy, x, y, z) -> np.ndarray:
    """Skin surface, flattened where the back lies on the table; the chest widens towards the abdomen."""
    zf = np.clip(z / an.hz, -1.5, 1.5)
    e = ellipse_sdf(x - an.cx, y - an.cy, an.a * (1 - 0.04 * zf), an.b * (1 - 0.02 * zf))
    return np.maximum(e, (an.cy - 0.9 * an.b) - y)


def cavity_sdf(an: Anatomy, x, y, z) -> np.ndarray:
    """Inner surface of the chest wall (inside the ribs)."""
    zf = np.clip(z / an.hz, -1.5, 1.5)
    # the upper thorax narrows towards the apex
    shrink = 1 - 0.10 * np.clip(zf - 0.3, 0, None) ** 2
    return ellipse_sdf(x - an.cx, y - an.cy - 0.04 * an.bc, an.ac * shrink * (1 - 0.04 * zf), an.bc * shrink)


def diaphragm_z(an: Anatomy, x, y) -> np.ndarray:
    """Height (mm) of the diaphragm under (x, y): two domes, lower laterally and posteriorly."""
    u = (x - an.cx) / an.ac
    v = (y - an.cy) / an.bc
    # RAS: +x is the patient's right; the domes meet under the heart without a step
    dome = np.maximum(
        an.z_dome_r - 1.4 * an.hz * (u - 0.45) ** 2, an.z_dome_l - 1.4 * an.hz * (u + 0.45) ** 2
    )
    return dome - an.hz * (0.45 * v**2 + 0.25 * np.clip(-v, 0, None) ** 2)  # round, deepest posteriorly


def spine_block_sdf(an: Anatomy, x, y, z) -> np.ndarray:
    """Vertebral column with posterior elements and paraspinal muscles (excluded from the lungs)."""
    s = an.s
    body = ellipse_sdf(x - an.cx, y - an.yv, an.rv_x + 3 * s, an.rv_y + 3 * s)
    para = ellipse_sdf(x - an.cx, y - (an.yv - 40 * s), 42 * s, 38 * s)
    return np.minimum(body, para)


def heart_local(an: Anatomy, x, y, z):
    """Coordinates in the heart's frame (rotated about z by ``heart_rot``)."""
    c, sn = np.cos(an.heart_rot), np.sin(an.heart_rot)
    dx, dy, dz = x - an.heart_c[0], y - an.heart_c[1], z - an.heart_c[2]
    return c * dx + sn * dy, -sn * dx + c * dy, dz


def heart_sdf(an: Anatomy, x, y, z) -> np.ndarray:
    hx, hy, hz = heart_local(an, x, y, z)
    e = ellipsoid_sdf(hx, hy, hz, an.heart_ax)
    ra_c, ra_r = an.chambers["RA"]
    ra = np.sqrt((x - ra_c[0]) ** 2 + (y - ra_c[1]) ** 2 + (z - ra_c[2]) ** 2) - ra_r - 3 * an.s
    return np.minimum(e, ra)


def chamber_sdf(an: Anatomy, name: str, x, y, z) -> np.ndarray:
    c, r = an.chambers[name]
    return np.sqrt((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) - r


def mediastinal_capsules(an: Anatomy) -> list[tuple[list[Segment], float]]:
    """Capsule groups bounding the lungs medially and their pleural margins (mm)."""
    s = an.s
    return [(an.aorta + an.svc + an.esophagus, 4 * s), (an.arteries[:4], 3 * s), (an.airway[:1], 3 * s)]


def mediastinum_sdf(an: Anatomy, x, y, z, caps: np.ndarray | None = None, heart=None) -> np.ndarray:
    """Everything between the lungs (heart, great vessels, airway, central band), dilated by a pleural margin.

    ``caps``: the union of :func:`mediastinal_capsules` (already dilated), precomputed on a grid;
    ``heart``: :func:`heart_sdf` precomputed on the same points.
    """
    s = an.s
    # a central band, narrowing anteriorly (anterior junction line)
    yn = np.clip((y - an.yv) / (an.cy + an.bc - an.yv), 0, 1)
    band = np.abs(x - (an.cx - 4 * s)) - s * (15 - 12 * yn)
    band = np.maximum(band, an.yv - y)  # anterior to the spine only
    hs = heart_sdf(an, x, y, z) if heart is None else heart
    med = np.minimum(band, hs - 4 * s)
    if caps is None:
        for segs, margin in mediastinal_capsules(an):
            med = np.minimum(med, capsules_sdf(x, y, z, segs) - margin)
    else:
        med = np.minimum(med, caps)
    return med


def lung_sdf(an: Anatomy, x, y, z, caps: np.ndarray | None = None, heart=None) -> np.ndarray:
    """Both lungs: inside the cavity, above the diaphragm, outside mediastinum and spine (approximate mm)."""
    d = cavity_sdf(an, x, y, z)
    d = np.maximum(d, diaphragm_z(an, x, y) - z)
    d = np.maximum(d, -mediastinum_sdf(an, x, y, z, caps, heart))
    d = np.maximum(d, -spine_block_sdf(an, x, y, z))
    return d


def lung_side(an: Anatomy, x) -> np.ndarray:
    """'R' where x is on the patient's right of the mediastinum (RAS: +x), else 'L'."""
    return np.where(x > an.cx - 4 * an.s, "R", "L")


# --------------------------------------------------------------------------------------------------
# sampling an anatomy


def _rng_u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _unit(v: np.ndarray) -> np.ndarray:
    n = float(np.linalg.norm(v))
    return v / n if n > 0 else v


def sample_anatomy(
    rng: np.random.Generator,
    half_extent: np.ndarray,
    *,
    tree_generations: int,
    murray_exponent: float,
    territory_points: int = 1200,
) -> Anatomy:
    """Draw one patient's anatomy for a field of view of half extent ``half_extent`` (3,) mm (centre = 0).

    Args:
        rng: the patient's anatomy stream.
        half_extent: (hx, hy, hz) half the NCT field of view in mm.
        tree_generations: deepest arterial generation (0 trunk, 1 main pulmonary artery, 2 lobar, 3 segmental,
            4+ subsegmental); >= 5 gives at least four generations inside each lung.
        murray_exponent: ``g`` in ``r_parent^g = sum r_child^g`` (3 = Murray's law).
        territory_points: points per lung used to grow the trees.
    """
    hx, hy, hz = (float(v) for v in half_extent)
    s = min(hx, hy) / 160.0
    u = lambda lo, hi: _rng_u(rng, lo, hi)  # noqa: E731
    a, b = u(128, 150) * s, u(100, 118) * s
    cx, cy = u(-6, 6) * s, u(-6, 4) * s
    t_fat, t_muscle = u(6, 20) * s, u(8, 13) * s
    wall = t_fat + t_muscle + 10 * s
    ac, bc = a - wall - 4 * s, b - wall
    yv = cy - 0.9 * b + u(55, 62) * s  # vertebral body centre, from the skin of the back
    an = Anatomy(
        s=s,
        hz=hz,
        cx=cx,
        cy=cy,
        a=a,
        b=b,
        t_fat=t_fat,
        t_muscle=t_muscle,
        ac=ac,
        bc=bc,
        yv=yv,
        rv_x=u(17, 21) * s,
        rv_y=u(14, 17) * s,
        rib_spacing=u(24, 30) * s,
        rib_phase=u(0, 30) * s,
        rib_drop=u(80, 110) * s,
        vert_height=u(25, 29) * s,
        vert_phase=u(0, 27) * s,
        z_dome_r=hz * u(-0.45, -0.25),
        z_dome_l=0.0,
        heart_c=np.zeros(3),
        heart_ax=np.zeros(3),
        heart_rot=0.0,
        chambers={},
        aorta=[],
        svc=[],
        airway=[],
        esophagus=[],
        arteries=[],
        veins=[],
    )
    an.z_dome_l = an.z_dome_r - u(8, 22) * s
    yf = yv + an.rv_y  # front of the vertebral body
    # heart: anterior-left, resting on the left dome
    an.heart_ax = np.array([u(48, 57) * s, u(38, 45) * s, u(40, 48) * s])
    heart_z = an.z_dome_l + an.heart_ax[2] * u(0.7, 0.85)  # resting on the left dome
    an.heart_rot = np.deg2rad(u(-40, -25))
    hy = float(np.hypot(an.heart_ax[0] * np.sin(an.heart_rot), an.heart_ax[1] * np.cos(an.heart_rot)))
    heart_y = min(yf + u(58, 70) * s, cy + bc - hy - u(3, 8) * s)  # behind the anterior chest wall
    an.heart_c = np.array([cx - u(12, 26) * s, heart_y, heart_z])
    hc = an.heart_c
    an.chambers = {
        "RV": (hc + np.array([u(6, 14), u(16, 22), u(-4, 4)]) * s, u(24, 30) * s),
        "LV": (hc + np.array([-u(14, 20), -u(6, 12), u(-6, 0)]) * s, u(22, 27) * s),
        "RA": (hc + np.array([u(40, 48), u(-4, 4), u(10, 18)]) * s, u(20, 25) * s),
        "LA": (np.array([cx - u(0, 8) * s, yf + u(24, 30) * s, hc[2] + u(35, 45) * s]), u(18, 23) * s),
    }
    # aorta: ascending (right-anterior), arch, descending (left of the spine)
    z_arch = hz * u(0.62, 0.8)
    asc0 = np.array([cx + u(8, 14) * s, min(yf + u(52, 62) * s, cy + bc - 30 * s), hc[2] + 30 * s])
    asc1 = np.array([asc0[0] + u(-3, 3) * s, asc0[1] - u(0, 6) * s, z_arch])
    des0 = np.array([cx - u(20, 26) * s, yv + u(8, 14) * s, z_arch])
    des1 = np.array([des0[0] + u(-3, 3) * s, des0[1] + u(-2, 2) * s, -1.6 * hz])
    r_asc, r_des = u(14, 17) * s, u(11, 13) * s
    arch = [asc1]
    for t in np.linspace(0, 1, 7)[1:]:
        arch.append((1 - t) * asc1 + t * des0 + np.array([0, 0, 18 * s * np.sin(np.pi * t)]))
    an.aorta = [Segment(asc0, asc1, r_asc, -1, "C")]
    for i in range(len(arch) - 1):
        an.aorta.append(Segment(arch[i], arch[i + 1], r_asc + (r_des - r_asc) * i / 6, -1, "C"))
    an.aorta.append(Segment(des0, des1, r_des, -1, "C"))
    ra_c, ra_r = an.chambers["RA"]
    an.svc = [Segment(np.array([ra_c[0] - 4 * s, asc0[1] - 12 * s, 1.5 * hz]), ra_c, u(9, 11) * s, -1, "C")]
    # airway
    z_car = hz * u(0.2, 0.35)
    tr_top = np.array([cx + u(-2, 2) * s, yf + 18 * s, 1.5 * hz])
    carina = np.array([cx - 2 * s, yf + u(14, 18) * s, z_car])
    rmb = carina + np.array([u(28, 34), u(-6, -2), -u(14, 20)]) * s
    lmb = carina + np.array([-u(36, 44), u(-8, -4), -u(18, 26)]) * s
    an.airway = [
        Segment(tr_top, carina, u(8, 10) * s, -1, "C"),
        Segment(carina, rmb, u(6.5, 7.5) * s, -1, "R"),
        Segment(carina, lmb, u(5.5, 6.5) * s, -1, "L"),
    ]
    an.esophagus = [
        Segment(
            np.array([cx - 6 * s, yf + 4 * s, 1.5 * hz]),
            np.array([cx - 12 * s, yf + 8 * s, -hz]),
            6.5 * s,
            -1,
            "C",
        )
    ]
    # pulmonary trunk from the right-ventricular outflow, bifurcating below the carina
    rv_c, rv_r = an.chambers["RV"]
    t0 = np.array([hc[0] + u(-4, 4) * s, rv_c[1] + u(0, 8) * s, rv_c[2] + 0.6 * rv_r])
    pb = np.array([cx - u(10, 16) * s, yf + u(38, 46) * s, z_car - u(8, 16) * s])
    h_r = np.array([cx + 0.42 * ac + u(-6, 6) * s, yf + u(22, 32) * s, pb[2] - u(4, 12) * s])
    h_l = np.array([cx - 0.45 * ac + u(-6, 6) * s, yf + u(16, 26) * s, pb[2] + u(0, 10) * s])
    r_pa = u(12.5, 15) * s
    r_rpa, r_lpa = u(10, 12) * s, u(9.5, 11.5) * s
    rpa_mid = np.array([(pb[0] + h_r[0]) / 2, pb[1] - 8 * s, (pb[2] + h_r[2]) / 2 - 3 * s])
    an.arteries = [
        Segment(t0, pb, r_pa, 0, "C"),
        Segment(pb, rpa_mid, r_rpa, 1, "R", 0),
        Segment(pb, h_l, r_lpa, 1, "L", 0),
        Segment(rpa_mid, h_r, r_rpa, 1, "R", 1),
    ]
    # territories: points inside each lung
    an._lattice = _LungLattice(an, np.array([hx, hy, hz]), 5.0 * s)
    pts = an._lattice.points(rng, -3 * s)
    side = lung_side(an, pts[:, 0])
    for sd, hilum, parent, r0 in (("R", h_r, 3, r_rpa), ("L", h_l, 2, r_lpa)):
        terr = pts[side == sd][:territory_points]
        if len(terr) < 8:
            continue
        hilum, parent = _enter_lung(an, an.arteries, hilum, terr, r0, parent, sd, 1)
        _grow(an, an.arteries, rng, hilum, terr, r0, 2, parent, sd, tree_generations, murray_exponent)
    # pulmonary veins: from the left atrium, same construction (unlabelled, enhanced less in CTPA)
    la_c, la_r = an.chambers["LA"]
    for sd, sgn in (("R", 1.0), ("L", -1.0)):
        terr = pts[side == sd][territory_points : 2 * territory_points]
        if len(terr) < 8:
            continue
        vh = la_c + np.array([sgn * (la_r + u(12, 20) * s), -u(0, 6) * s, -u(6, 14) * s])
        rv0 = u(6.5, 8) * s
        an.veins.append(Segment(la_c, vh, rv0, 1, sd))
        vh, vp = _enter_lung(an, an.veins, vh, terr, rv0, len(an.veins) - 1, sd, 1)
        _grow(an, an.veins, rng, vh, terr, rv0, 2, vp, sd, tree_generations, murray_exponent)
    return an


class _LungLattice:
    """The lung signed distance tabulated on a coarse lattice (``step`` mm), for growing the trees fast."""

    def __init__(self, an: Anatomy, half: np.ndarray, step: float):
        self.lo = -half
        self.step = step
        axes = [np.arange(-h, h + step / 2, step, dtype=np.float32) for h in half]
        x, y, z = np.meshgrid(*axes, indexing="ij")
        self.sdf = lung_sdf(an, x, y, z)
        self.xyz = np.stack([x, y, z], -1)

    def points(self, rng: np.random.Generator, below: float) -> np.ndarray:
        """Lattice points deeper than ``below`` mm in the lung, jittered and shuffled: (N, 3)."""
        p = self.xyz[self.sdf < below].astype(float)
        p += rng.uniform(-0.5, 0.5, p.shape) * self.step
        return p[rng.permutation(len(p))]

    def inside(self, p: np.ndarray) -> np.ndarray:
        idx = np.rint((p - self.lo) / self.step).astype(int)
        ok = np.all((idx >= 0) & (idx < self.sdf.shape), axis=-1)
        idx = np.clip(idx, 0, np.array(self.sdf.shape) - 1)
        return ok & (self.sdf[idx[..., 0], idx[..., 1], idx[..., 2]] < 0)


def _inside_lung(an: Anatomy, p: np.ndarray) -> np.ndarray:
    return an._lattice.inside(p)


def _enter_lung(an, segs, start, terr, r, parent, side, gen):
    """Extend a hilar vessel from ``start`` towards its territory until it is 4 mm inside the lung."""
    c = terr.mean(axis=0)
    ts = np.linspace(0, 1, 41)
    line = start[None, :] + ts[:, None] * (c - start)[None, :]
    inside = np.flatnonzero(_inside_lung(an, line))
    inside = inside[inside >= 2] if len(inside) > 2 else inside
    if len(inside) == 0 or inside[0] == 0:
        return start, parent
    end = line[inside[0]]
    segs.append(Segment(start.copy(), end, float(r), gen, side, parent))
    return end, len(segs) - 1


def _grow(an, segs, rng, start, terr, r, gen, parent, side, max_gen, g):
    """Territory bisection: split ``terr`` (N, 3) in two and grow one branch towards each half."""
    c = terr.mean(axis=0)
    cov = np.cov((terr - c).T) if len(terr) > 3 else np.eye(3)
    w, v = np.linalg.eigh(cov)
    normal = _unit(v[:, -1] + rng.normal(0, 0.25, 3))
    proj = (terr - c) @ normal
    cut = float(np.quantile(proj, rng.uniform(0.35, 0.65)))
    halves = [terr[proj <= cut], terr[proj > cut]]
    n = float(len(terr))
    for half in halves:
        if len(half) < 2:
            continue
        rc = r * (len(half) / n) ** (1.0 / g)
        hc = half.mean(axis=0)
        last = gen >= max_gen or len(half) < 6
        if last:  # terminal branches run on towards the far edge of their territory (the pleura)
            far = half[np.argmax(((half - start) ** 2).sum(1))]
            end = start + 0.5 * (hc - start) + 0.5 * (far - start)
        else:
            end = start + rng.uniform(0.35, 0.6) * (hc - start)
        # clip the branch to the lung: walk along it and stop at the first outside sample
        ts = np.linspace(0.15, 1.0, 8)
        samples = start[None, :] + ts[:, None] * (end - start)[None, :]
        ok = _inside_lung(an, samples)
        if not ok.any():
            continue
        first = int(np.argmax(ok))
        if not ok[first:].all():  # leaves the lung again: stop at the last inside sample
            k = first + int(np.argmin(ok[first:]))
            end = samples[k - 1]
        if np.linalg.norm(end - start) < 1.0:
            continue
        segs.append(Segment(start.copy(), end, float(rc), gen, side, parent))
        me = len(segs) - 1
        if not last and rc > 0.9 * an.s:
            _grow(an, segs, rng, end, half, rc, gen + 1, me, side, max_gen, g)
