"""The synthetic dual-phase chest CT cohort (``cpmn synthetic``).

- ``anatomy``: the chest as signed distances of world coordinates, with recursive pulmonary-artery trees.
- ``physics``: tissue HU per phase, emboli, rendering, blur and noise, the cross-phase misalignment.
- ``cohort``: :func:`cohort.generate_cohort`, :func:`cohort.generate_patient` (files, truth, sheet, readers).
- ``dicom``: the DICOM series writer; ``montage``: the overview figure; ``cli``: the subcommand.
"""
