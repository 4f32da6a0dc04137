"""The training dataset: balanced positive/negative patches drawn from the per-patient patch banks.

Reads ``results/preprocessed/{pid}.npz`` (``nct``, ``ctpa``, ``mask``; see docs/contracts.md) and
``results/patches/{pid}.npz`` (``centres`` (K, 3), ``positive`` (K,)) for the training patients, and keeps
the arrays in memory (all of them by default, or an LRU cache of ``max_cached`` patients).

Sample ``i`` is a pure function of ``(seed, i)``: a generator seeded with ``[seed, i]`` decides positive or
negative (probability ``pos_fraction`` of a positive draw while the cohort has positive centres), the bank
entry, a small jitter of the centre and the seeds of the MONAI random transforms. A run's sampler position
is therefore one integer (the next sample index), which makes resume exact, with any number of workers.

Cropping: the P-sized window around the (jittered) centre is cut with MONAI ``SpatialCrop`` (clipped to the
volume) and padded back to P with ``BorderPad`` by exactly the part that fell outside, so the centre stays
at the patch centre (the same result as ``SpatialPad`` of the whole volume followed by a crop, without
padding the whole volume). The pad value is 0, i.e. air after the HU window. Augmentation: MONAI
``RandFlipd`` on each axis and ``RandRotate90d`` in the x-y plane (only when P_x = P_y), each with
probability ``aug_prob``, applied to CTPA, NCT and mask together.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import BorderPad, RandFlipd, RandRotate90d, SpatialCrop
from torch.utils.data import Dataset, Sampler

from cpmn.data.patches import DEFAULT_PATCH
from cpmn.data.preprocess import read_preprocessed
from cpmn.errors import InputError

#: samples per "epoch" of the index space; the trainer draws indices from a range, never iterates all
INDEX_SPACE = 2**62


def _plain(t: Any) -> torch.Tensor:
    """A MONAI ``MetaTensor`` (or array) as a plain ``torch.Tensor`` (cheaper to collate)."""
    return t.as_tensor() if isinstance(t, MetaTensor) else torch.as_tensor(t)


def load_patient(pid: str, preprocessed_dir: str | Path) -> dict[str, np.ndarray]:
    """``ctpa``, ``nct`` float32 ``(X, Y, Z)``, ``mask`` uint8 ``(X, Y, Z)``, ``label`` and, where stored,
    ``spacing`` (mm, 3) of one patient."""
    path = Path(preprocessed_dir) / f"{pid}.npz"
    z = read_preprocessed(pid, path, ("nct", "ctpa", "mask"), ("label", "spacing"))
    out = {
        "ctpa": np.ascontiguousarray(z["ctpa"], dtype=np.float32),
        "nct": np.ascontiguousarray(z["nct"], dtype=np.float32),
        "mask": np.ascontiguousarray(z["mask"] > 0, dtype=np.uint8),
        "label": np.asarray(int(z["label"]) if "label" in z else -1),
    }
    if "spacing" in z:
        out["spacing"] = np.asarray(z["spacing"], dtype=float)
    shapes = {k: out[k].shape for k in ("ctpa", "nct", "mask")}
    if len(set(shapes.values())) != 1 or len(out["nct"].shape) != 3:
        raise InputError(pid, path, f"ctpa/nct/mask must be 3D arrays of one shape, got {shapes}")
    return out


def load_bank(pid: str, patches_dir: str | Path, shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """``centres`` (K, 3) int64 and ``positive`` (K,) bool of one patient's bank, checked against shape."""
    path = Path(patches_dir) / f"{pid}.npz"
    if not path.is_file():
        raise InputError(pid, path, "patch bank not found")
    try:
        with np.load(path) as z:
            centres = np.asarray(z["centres"], dtype=np.int64).reshape(-1, 3)
            positive = np.asarray(z["positive"], dtype=bool).reshape(-1)
    except Exception as err:
        raise InputError(pid, path, f"cannot read patch bank ({err})") from err
    if len(centres) != len(positive):
        raise InputError(pid, path, f"{len(centres)} centres but {len(positive)} positive flags")
    if len(centres) and ((centres < 0).any() or (centres >= np.asarray(shape)).any()):
        raise InputError(pid, path, f"patch centres outside the preprocessed volume of shape {tuple(shape)}")
    return centres, positive


class StepShard(Sampler[int]):
    """The sample indices of optimiser steps ``start .. stop - 1`` that one of ``world`` processes draws.

    Step ``s`` of a global batch ``B`` is samples ``s·B .. s·B + B - 1``; rank ``r`` takes its ``B / world``
    consecutive ones, ``s·B + r·b .. s·B + (r + 1)·b - 1`` with ``b = B / world``. The ranks' indices are
    disjoint, together they are one process's, and the sampler position stays ``step·B``, so the exact
    resume works unchanged. With ``world = 1`` these are the indices ``start·B .. stop·B - 1``.
    """

    def __init__(self, start: int, stop: int, batch: int, rank: int = 0, world: int = 1):
        if batch % world:
            raise ValueError(f"batch {batch} is not divisible by {world} processes")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in 0..{world - 1}")
        self.start, self.stop, self.batch, self.rank, self.world = int(start), int(stop), batch, rank, world

    def __iter__(self) -> Iterator[int]:
        b = self.batch // self.world
        for s in range(self.start, self.stop):
            first = s * self.batch + self.rank * b
            yield from range(first, first + b)

    def __len__(self) -> int:
        return max(0, self.stop - self.start) * (self.batch // self.world)


class PatchDataset(Dataset):
    """Balanced training patches from the patch banks of ``patients``.

    ``dataset[i]`` is a dict of float32 tensors ``ctpa``, ``nct``, ``mask`` ``(1, *patch_size)`` (mask in
    {0, 1}) and ``label`` ``()`` = 1.0 when the patch's mask holds any embolus voxel (the same target the
    segmentation sees), plus ``positive`` ``()`` (the bank's flag of the drawn centre).

    Args:
        patients: training patient ids.
        preprocessed_dir, patches_dir: folders of ``{pid}.npz``.
        patch_size: P = (X, Y, Z).
        aug_prob: probability of each random flip / rotation.
        seed: the sampling seed.
        jitter: the centre moves by up to this many voxels per axis.
        pos_fraction: probability that a sample is drawn from the positive centres.
        max_cached: keep at most this many patients' arrays in memory (None: all, loaded up front).
    """

    def __init__(
        self,
        patients: Sequence[str],
        preprocessed_dir: str | Path,
        patches_dir: str | Path,
        patch_size: Sequence[int] = DEFAULT_PATCH,
        aug_prob: float = 0.1,
        seed: int = 0,
        jitter: int = 4,
        pos_fraction: float = 0.5,
        max_cached: int | None = None,
    ):
        if not patients:
            raise InputError(None, preprocessed_dir, "no training patients")
        self.patients = list(patients)
        self.preprocessed_dir = Path(preprocessed_dir)
        self.patch_size = tuple(int(s) for s in patch_size)
        self.aug_prob = float(aug_prob)
        self.seed = int(seed)
        self.jitter = int(jitter)
        self.pos_fraction = float(pos_fraction)
        self.max_cached = max_cached
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        pools: dict[bool, list[np.ndarray]] = {True: [], False: []}
        for k, pid in enumerate(self.patients):
            vol = load_patient(pid, preprocessed_dir)
            centres, positive = load_bank(pid, patches_dir, vol["nct"].shape)
            if max_cached is None:
                self._cache[k] = self._stack(vol)
            for flag in (True, False):
                sel = centres[positive == flag]
                pools[flag].append(np.column_stack([np.full(len(sel), k), sel]))
        self.pos = np.concatenate(pools[True]).astype(np.int64)  # (Kp, 4): patient index, x, y, z
        self.neg = np.concatenate(pools[False]).astype(np.int64)  # (Kn, 4)
        if len(self.pos) + len(self.neg) == 0:
            raise InputError(None, patches_dir, "the patch banks of the training patients are empty")
        keys = ["image"]
        self.flips = [RandFlipd(keys, prob=self.aug_prob, spatial_axis=a) for a in range(3)]
        rotate = self.patch_size[0] == self.patch_size[1]
        self.rotate = RandRotate90d(keys, prob=self.aug_prob, spatial_axes=(0, 1)) if rotate else None

    @staticmethod
    def _stack(vol: dict[str, np.ndarray]) -> np.ndarray:
        """``(3, X, Y, Z)`` float32: CTPA, NCT, mask."""
        return np.stack([vol["ctpa"], vol["nct"], vol["mask"].astype(np.float32)])

    def volume(self, k: int) -> np.ndarray:
        """The cached ``(3, X, Y, Z)`` stack of patient index ``k``."""
        if k in self._cache:
            self._cache.move_to_end(k)
            return self._cache[k]
        arr = self._stack(load_patient(self.patients[k], self.preprocessed_dir))
        self._cache[k] = arr
        while self.max_cached is not None and len(self._cache) > max(1, self.max_cached):
            self._cache.popitem(last=False)
        return arr

    def __len__(self) -> int:
        return INDEX_SPACE

    def crop(self, arr: np.ndarray, centre: Sequence[int]) -> torch.Tensor:
        """The ``(C, *patch_size)`` window of ``arr`` ``(C, X, Y, Z)`` centred on ``centre`` (zero-padded)."""
        shape = arr.shape[1:]
        start = [int(c) - p // 2 for c, p in zip(centre, self.patch_size, strict=True)]
        end = [s + p for s, p in zip(start, self.patch_size, strict=True)]
        lo = [max(0, s) for s in start]
        hi = [min(n, e) for n, e in zip(shape, end, strict=True)]
        out = SpatialCrop(roi_start=lo, roi_end=hi)(torch.from_numpy(arr))
        border = []
        for s, e, a, b in zip(start, end, lo, hi, strict=True):
            border += [a - s, e - b]
        if any(border):
            out = BorderPad(spatial_border=border, mode="constant")(out)
        return _plain(out).contiguous()

    def __getitem__(self, index: int) -> dict[str, Any]:
        rng = np.random.default_rng([self.seed, int(index)])
        want_pos = rng.random() < self.pos_fraction
        pool = self.pos if (want_pos and len(self.pos)) or not len(self.neg) else self.neg
        k, *centre = pool[rng.integers(len(pool))]
        centre = np.asarray(centre) + rng.integers(-self.jitter, self.jitter + 1, size=3)
        patch = self.crop(self.volume(int(k)), centre)
        data = {"image": patch}
        for t in [*self.flips, self.rotate]:
            if t is not None:
                t.set_random_state(seed=int(rng.integers(2**31)))
                data = t(data)
        img = _plain(data["image"]).float()
        mask = (img[2:3] > 0.5).float()
        return {
            "ctpa": img[0:1].contiguous(),
            "nct": img[1:2].contiguous(),
            "mask": mask,
            "label": (mask.amax() > 0).float(),
            "positive": torch.tensor(float(pool is self.pos)),
        }
