"""Fig. 2: (a) ROC curves on the test split with the readers' operating points, (b) one test PE case.

Both are written as PNG (300 dpi) and PDF with matplotlib's Agg backend, sized for a journal column
(fonts 8-9 pt). Images are shown in radiological convention: the NIfTI is reoriented to RAS+
(``nibabel.as_closest_canonical``), the patient's right is on the viewer's left and anterior is up.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from sklearn.metrics import roc_curve

from cpmn.data.niftiio import load_nifti
from cpmn.errors import InputError, atomic_path
from cpmn.evaluate.metrics import VariantEval

FONT = {
    "font.size": 8,
    "axes.titlesize": 9,
    "axes.labelsize": 8,
    "legend.fontsize": 7.5,
    "xtick.labelsize": 7.5,
    "ytick.labelsize": 7.5,
}
READER_MARKERS = ("s", "^", "D", "v", "P", "X", "<", ">")


def _plt():
    # matplotlib: heavy, and the Agg backend must be chosen before pyplot is imported
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out_dir: Path, stem: str) -> list[Path]:
    paths = []
    for ext in ("png", "pdf"):
        final = out_dir / f"{stem}.{ext}"
        with atomic_path(final) as tmp:
            fig.savefig(tmp, dpi=300, bbox_inches="tight", format=ext)
        paths.append(final)
    return paths


def fig2a_roc(
    methods: list[tuple[str, VariantEval]], readers: dict[str, Any] | None, out_dir: str | Path
) -> list[Path]:
    """ROC curve per method (AUC in the legend, its validation-threshold operating point as a dot) and
    each reader's operating point (1 - specificity, sensitivity) as a marker; the mean reader as a star."""
    plt = _plt()
    with plt.rc_context(FONT):
        fig, ax = plt.subplots(figsize=(3.5, 3.5))
        ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="0.6", label="Chance")
        for k, (label, ev) in enumerate(methods):
            fpr, tpr, _ = roc_curve(ev.label, ev.prob)
            auc = ev.metrics["auc"]["value"]
            (line,) = ax.plot(fpr, tpr, lw=1.4, color=f"C{k}", label=f"{label} (AUC {auc:.3f})")
            sens, spec = ev.metrics["sensitivity"]["value"], ev.metrics["specificity"]["value"]
            ax.plot([1 - spec], [sens], "o", ms=4.5, color=line.get_color(), mec="k", mew=0.5)
        if readers:
            for k, (name, r) in enumerate(sorted(readers["readers"].items())):
                ax.plot(
                    1 - r["specificity"]["value"],
                    r["sensitivity"]["value"],
                    READER_MARKERS[k % 8],
                    ms=5,
                    mfc="none",
                    mec="k",
                    mew=0.9,
                    label=f"Reader {name}",
                )
            m = readers["mean"]
            ax.plot(
                1 - m["specificity"]["value"],
                m["sensitivity"]["value"],
                "*",
                ms=9,
                color="k",
                label="Radiologists (mean)",
            )
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.02)
        ax.set_aspect("equal")
        ax.set_xlabel("1 − specificity")
        ax.set_ylabel("Sensitivity")
        ax.set_title("ROC on the test split (dots: validation threshold)", fontsize=8)
        ax.grid(alpha=0.3, lw=0.5)
        ax.legend(loc="lower right", frameon=True, framealpha=0.9)
        paths = _save(fig, Path(out_dir), "fig2a_roc")
        plt.close(fig)
    return paths


def _canonical(path: Path, patient: str, what: str):
    img = nib.as_closest_canonical(load_nifti(path, patient, what))
    return np.asarray(img.dataobj, dtype=np.float32), np.asarray(img.header.get_zooms()[:3], dtype=float)


def _cam_overlay(fig, ax, cam: np.ndarray, z: int, extent: tuple[float, ...]) -> None:
    """Slice ``z`` of the CAM in jet over what ``ax`` shows, scaled to the whole volume's range, with a
    colour bar."""
    im = ax.imshow(
        cam[:, :, z].T,
        cmap="jet",
        alpha=0.45,
        origin="lower",
        extent=extent,
        interpolation="bilinear",
        vmin=float(cam.min()),
        vmax=float(cam.max()) or 1.0,
    )
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02).set_label("CAM (a.u.)")


def choose_case(ev: VariantEval, case: str = "auto") -> tuple[str, int] | None:
    """The Fig. 2b case: ``(patient_id, row in ev.test)``; ``auto`` = the test PE patient with the largest
    reference embolus volume (mm^3) that has an image; ``None`` when there is none."""
    t = ev.test
    if case != "auto":
        hits = np.flatnonzero(t.patient_id.astype(str) == case)
        if not len(hits):
            raise InputError(
                case, t.path, "evaluate.fig2b_case is not a test patient of the reference variant"
            )
        return case, int(hits[0])
    if "ref_mask" not in t.paths or "image" not in t.paths:
        return None
    best: tuple[float, str, int] | None = None
    for i in np.flatnonzero(t.label == 1):
        rp, ip = t.path_of("ref_mask", i), t.path_of("image", i)
        if rp is None or ip is None:
            continue
        pid = str(t.patient_id[i])
        ref, zooms = _canonical(rp, pid, "reference mask")
        vol = float((ref > 0.5).sum() * np.prod(zooms))
        if vol > 0 and (best is None or vol > best[0]):
            best = (vol, pid, int(i))
    return None if best is None else (best[1], best[2])


def fig2b_case(
    ev: VariantEval,
    out_dir: str | Path,
    case: str = "auto",
    window: tuple[float, float] = (-160.0, 240.0),
    label: str | None = None,
) -> dict[str, Any] | None:
    """Three panels of one test PE case on the axial slice with the most reference voxels: the NCT slice
    with the reference contour (green), the predicted mask (red) and the CAM overlay, the last two zoomed
    on the embolus (yellow box in the first panel). ``window`` = HU (mediastinal W400/L40 by default;
    an image already scaled to [0, 1] is shown on [0, 1]). Returns ``{patient_id, slice, paths}`` or
    ``None`` (with no case to show)."""
    picked = choose_case(ev, case)
    if picked is None:
        return None
    pid, i = picked
    t = ev.test
    ip, rp = t.path_of("image", i), t.path_of("ref_mask", i)
    if ip is None or rp is None:
        raise InputError(pid, t.path, "Fig. 2b needs the image and ref_mask columns for this case")
    img, zooms = _canonical(ip, pid, "image")
    ref = _canonical(rp, pid, "reference mask")[0] > 0.5
    mp, cp = t.path_of("mask", i), t.path_of("cam", i)
    pred = _canonical(mp, pid, "mask")[0] > 0.5 if mp is not None else None
    cam = _canonical(cp, pid, "CAM")[0] if cp is not None else None
    for name, arr in (("ref_mask", ref), ("mask", pred), ("cam", cam)):
        if arr is not None and arr.shape != img.shape:
            raise InputError(pid, t.path, f"{name} shape {arr.shape} differs from image shape {img.shape}")
    z = int(np.argmax(ref.sum(axis=(0, 1))))
    sl = img[:, :, z]
    lo, hi = (0.0, 1.0) if sl.max() <= 1.5 and sl.min() >= -0.5 else window
    sx, sy = float(zooms[0]), float(zooms[1])
    nx, ny = sl.shape
    extent = (-0.5 * sx, (nx - 0.5) * sx, -0.5 * sy, (ny - 0.5) * sy)
    xs, ys = np.arange(nx) * sx, np.arange(ny) * sy
    # zoom box: centred on the embolus, side >= 80 mm and >= 3x its extent on this slice
    ii, jj = np.nonzero(ref[:, :, z])
    if len(ii):
        cx, cy = ii.mean() * sx, jj.mean() * sy
        half = max(40.0, 1.5 * max((np.ptp(ii) + 1) * sx, (np.ptp(jj) + 1) * sy))
    else:  # a case given in the config may have an empty reference: zoom on the centre
        cx, cy, half = 0.5 * (nx - 1) * sx, 0.5 * (ny - 1) * sy, 40.0
    half = min(half, 0.5 * (extent[1] - extent[0]), 0.5 * (extent[3] - extent[2]))
    cx = float(np.clip(cx, extent[0] + half, extent[1] - half))  # keep the box inside the image
    cy = float(np.clip(cy, extent[2] + half, extent[3] - half))
    box = (cx - half, cx + half, cy - half, cy + half)

    plt = _plt()
    with plt.rc_context(FONT):
        fig, axes = plt.subplots(1, 3, figsize=(7.2, 2.75), constrained_layout=True)
        titles = (f"NCT, axial slice z = {z}", "Predicted mask (red), zoom", "CAM, zoom")
        for k, ax in enumerate(axes):
            ax.imshow(
                sl.T, cmap="gray", vmin=lo, vmax=hi, origin="lower", extent=extent, interpolation="nearest"
            )
            if k == 1 and pred is not None:
                ov = np.ma.masked_where(~pred[:, :, z].T, np.ones_like(sl.T))
                ax.imshow(
                    ov, cmap="autumn", alpha=0.6, origin="lower", extent=extent, interpolation="nearest"
                )
            if k == 2 and cam is not None:
                _cam_overlay(fig, ax, cam, z, extent)
            if (k == 1 and pred is None) or (k == 2 and cam is None):
                ax.text(0.5, 0.5, "not available", transform=ax.transAxes, ha="center", color="w")
            if ref[:, :, z].any():
                ax.contour(xs, ys, ref[:, :, z].T.astype(float), levels=[0.5], colors="lime", linewidths=1.0)
            if k == 0:
                ax.add_patch(
                    plt.Rectangle((box[0], box[2]), 2 * half, 2 * half, fill=False, ec="yellow", lw=0.8)
                )
                ax.set_xlim(extent[1], extent[0])
                ax.set_ylim(extent[2], extent[3])
            else:
                ax.set_xlim(box[1], box[0])  # radiological: patient right on the left
                ax.set_ylim(box[2], box[3])
            ax.set_title(titles[k])
            ax.set_xlabel("x (mm)")
            ax.set_ylabel("y (mm)")
            for txt, xy in (("R", (0.03, 0.5)), ("L", (0.97, 0.5)), ("A", (0.5, 0.96))):
                ax.text(
                    *xy, txt, transform=ax.transAxes, ha="center", va="center", color="yellow", fontsize=8
                )
        d = ev.metrics["dice"]["per_patient"].get(pid)
        sup = (
            f"{label or ev.variant}: test patient {pid}, p = {float(t.prob[i]):.3f}, reference contour green"
        )
        if d is not None and np.isfinite(d):
            sup += f", Dice = {100 * d:.1f} %"
        fig.suptitle(sup, fontsize=9)
        paths = _save(fig, Path(out_dir), "fig2b_case")
        plt.close(fig)
    return {"patient_id": pid, "slice": z, "window": [lo, hi], "paths": [str(p) for p in paths]}


def cam_overview(
    image: np.ndarray,
    cam: np.ndarray,
    spacing: tuple[float, float, float] | np.ndarray,
    out: str | Path,
    title: str,
    mask: np.ndarray | None = None,
    ref: np.ndarray | None = None,
    z: int | None = None,
) -> int:
    """One PNG per CAM (written by ``cpmn infer`` next to the CAM NIfTI): the axial slice ``z``, by default
    the one with the most reference voxels (the slice of the CAM maximum when there is no reference), of
    ``image`` (``(X, Y, Z)``
    in canonical RAS voxel order, window-normalised to [0, 1]) with the CAM overlaid (jet), the predicted
    ``mask`` contour (red) and the reference ``ref`` contour (green). ``spacing`` (mm) scales the axes;
    radiological convention as in Fig. 2b. Returns the slice index ``z``.
    """
    if cam.shape != image.shape:
        raise ValueError(f"cam shape {cam.shape} differs from image shape {image.shape}")
    if z is not None:
        z = int(z)
    elif ref is not None and np.any(ref > 0.5):
        z = int(np.argmax((ref > 0.5).sum(axis=(0, 1))))
    else:
        z = int(np.unravel_index(int(np.argmax(cam)), cam.shape)[2])
    sx, sy = float(spacing[0]), float(spacing[1])
    nx, ny = image.shape[:2]
    extent = (-0.5 * sx, (nx - 0.5) * sx, -0.5 * sy, (ny - 0.5) * sy)
    xs, ys = np.arange(nx) * sx, np.arange(ny) * sy
    plt = _plt()
    with plt.rc_context(FONT):
        fig, ax = plt.subplots(figsize=(3.6, 3.4), constrained_layout=True)
        ax.imshow(image[:, :, z].T, cmap="gray", vmin=0.0, vmax=1.0, origin="lower", extent=extent)
        _cam_overlay(fig, ax, cam, z, extent)
        for arr, colour in ((mask, "red"), (ref, "lime")):
            if arr is not None and np.any(arr[:, :, z] > 0.5):
                ax.contour(xs, ys, (arr[:, :, z] > 0.5).T.astype(float), levels=[0.5], colors=colour)
        ax.set_xlim(extent[1], extent[0])  # radiological: patient right on the left
        ax.set_ylim(extent[2], extent[3])
        ax.set_xlabel("x (mm)")
        ax.set_ylabel("y (mm)")
        ax.set_title(f"{title}\naxial z = {z}; mask red, reference green", fontsize=8)
        with atomic_path(out) as tmp:
            fig.savefig(tmp, dpi=150, format="png")
        plt.close(fig)
    return z
