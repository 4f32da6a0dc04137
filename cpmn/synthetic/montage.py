"""DIR/montage.png: axial and coronal slices of both phases for one PE and one normal phantom patient."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def _axial(vol: np.ndarray, k: int) -> np.ndarray:
    """Radiological display of axial slice k of an LAS (x: right->left, y: posterior->anterior) volume."""
    return vol[:, :, k].T[::-1, :]


def _coronal(vol: np.ndarray, j: int) -> np.ndarray:
    return vol[:, j, :].T[::-1, :]


def write_montage(cases: list[dict], out_png: str | Path) -> Path:
    """Render the montage of ``cases``: results of :func:`cpmn.synthetic.cohort.generate_patient` with
    ``keep_arrays`` (the caller regenerates them; no DICOM is read).

    Rows: one per case (the cohort passes one PE and one normal patient). Columns: NCT axial and CTPA
    axial in a mediastinal window (W 700 / L 100), NCT and CTPA coronal in a lung-to-bone window
    [-1000, 600]. The CTPA embolus outline is drawn in red; the axial slice passes through the largest
    embolus.
    """
    # matplotlib: heavy, and the Agg backend must be chosen before pyplot is imported
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(cases), 4, figsize=(16, 4.2 * len(cases)), squeeze=False, facecolor="black")
    for r, res in enumerate(cases):
        a = res["arrays"]
        mask = a["mask_ctpa"]
        if mask.any():
            lab_k = int(np.argmax(mask.sum(axis=(0, 1))))
            j = int(np.round(np.argwhere(mask)[:, 1].mean()))
        else:
            lab_k, j = mask.shape[2] * 3 // 5, mask.shape[1] // 2
        sz = float(np.linalg.norm(a["nct_affine"][:3, 2]) / np.linalg.norm(a["nct_affine"][:3, 0]))
        panels = [
            (_axial(a["nct"], lab_k), (-250, 450), None, 1.0, "NCT axial"),
            (_axial(a["ctpa"], lab_k), (-250, 450), _axial(mask, lab_k), 1.0, "CTPA axial"),
            (_coronal(a["nct"], j), (-1000, 600), None, sz, "NCT coronal"),
            (_coronal(a["ctpa"], j), (-1000, 600), _coronal(mask, j), sz, "CTPA coronal"),
        ]
        for c, (img, (lo, hi), outline, aspect, title) in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, aspect=aspect, interpolation="bilinear")
            if outline is not None and outline.any():
                ax.contour(outline, levels=[0.5], colors="red", linewidths=0.8)
            ax.set_axis_off()
            kind = "PE" if res["label"] else "normal"
            ax.set_title(f"{res['patient_id']} ({kind}) {title}", color="white", fontsize=10)
    fig.suptitle("cpmn synthetic dual-phase chest CT (phantom, not patient data)", color="white")
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=80, facecolor="black")
    plt.close(fig)
    return out_png


def clot_summary(cohort_dir: str | Path, pid: str) -> list[dict]:
    """The clots recorded in ``truth/{pid}/truth.json``."""
    return json.loads((Path(cohort_dir) / "truth" / pid / "truth.json").read_text())["clots"]
