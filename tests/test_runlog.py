"""cpmn.runlog: the sheet's column check, the exclusions and the failure summary the workflow prints."""

from __future__ import annotations

from cpmn.runlog import exclusion_lines, failed_patients, failure_lines, sheet_column_error

REQUIRED = ["patient_id", "label", "study_date", "nct_dicom", "ctpa_dicom", "ctpa_mask"]


def test_sheet_column_error(tmp_path):
    good = tmp_path / "good.tsv"
    good.write_text("\t".join(REQUIRED) + "\textra\nP1\t1\t2022-01-01\ta\tb\tc\td\n")
    assert sheet_column_error(good, REQUIRED) is None
    short = tmp_path / "short.tsv"
    short.write_text("patient_id\tlabel\tnct_dicom\n")
    assert sheet_column_error(short, REQUIRED) == (
        f"cohort sheet {short}: lacks column(s) study_date, ctpa_dicom, ctpa_mask"
    )
    comma = tmp_path / "comma.csv"
    comma.write_text(",".join(REQUIRED) + "\n")
    assert sheet_column_error(comma, REQUIRED) == (
        f"cohort sheet {comma}: lacks column(s) {', '.join(REQUIRED)} (the sheet is read as tab-separated,"
        " TSV; this header is comma-separated: save it as TSV)"
    )
    missing = tmp_path / "nope.tsv"
    assert sheet_column_error(missing, REQUIRED).startswith(f"cohort sheet {missing}: cannot read it (")


def test_exclusion_lines(tmp_path):
    assert exclusion_lines(tmp_path / "absent.tsv") == []
    tsv = tmp_path / "excluded.tsv"
    tsv.write_text("patient_id\tstage\tfile\treason\n")
    assert exclusion_lines(tsv) == []
    tsv.write_text(
        "patient_id\tstage\tfile\treason\n"
        "P1\tdicom\t/d/P1/nct\tno axial series\n"
        "P1\tmask\t/d/P1/m.nii.gz\tempty mask\n"
        "\tsheet\t/s.tsv\tdata row 3 (line 4): column patient_id: '' is too short\n"
    )
    assert exclusion_lines(tsv) == [
        "EXCLUDED patient P1: /d/P1/nct: no axial series",
        "EXCLUDED patient P1: /d/P1/m.nii.gz: empty mask",
        "EXCLUDED patient ?: /s.tsv: data row 3 (line 4): column patient_id: '' is too short",
        f"3 row(s) excluded by screening (2 patient id(s)): see {tsv}",
    ]


def _snakemake_log(tmp_path, jobs):
    """A Snakemake log with one ``Error in rule`` block per (rule, job log text or None: unreadable)."""
    text = ["Building DAG of jobs...", "[Mon Dec  7 03:00:00 2026]", "localrule all:"]
    for i, (rule, body) in enumerate(jobs):
        log = tmp_path / f"{rule}_{i}.log"
        if body is not None:
            log.write_text(body)
        text += [
            f"Error in rule {rule}:",
            "    message: None",
            f"    jobid: {i}",
            f"    output: results/x/{i}",
            f"    log: {log} (check log file(s) for error details)",
            "    shell:",
            "        cpmn something",
            "        (one of the commands exited with non-zero exit code)",
            "",
        ]
    text += ["Shutting down, this might take some time.", "Exiting because a job execution failed."]
    main = tmp_path / "snakemake.log"
    main.write_text("\n".join(text) + "\n")
    return main


def test_failed_patients_reads_each_failed_jobs_log(tmp_path):
    main = _snakemake_log(
        tmp_path,
        [
            ("register", "starting\nERROR patient P7: /r/P7/nct.nii.gz: the image is constant\nTraceback\n"),
            ("convert", "ERROR patient P9: /d/P9: no series\nERROR patient P9: /d/P9: second line\n"),
            ("train", "a Python traceback without a cpmn error line\n"),
            ("split", "ERROR patient ?: /r/cohort.included.tsv: the test year has no PE patient\n"),
            ("preprocess", None),  # the job's log was never written
        ],
    )
    assert failed_patients([main, tmp_path / "missing.log"]) == {
        "P7": "ERROR patient P7: /r/P7/nct.nii.gz: the image is constant",
        "P9": "ERROR patient P9: /d/P9: no series",
        "?": "ERROR patient ?: /r/cohort.included.tsv: the test year has no PE patient",
    }
    # an ERROR line outside a failed job's block (a job that logged it and still succeeded) is not a failure
    other = tmp_path / "ok.log"
    other.write_text(f"rule x:\n    log: {tmp_path / 'register_0.log'}\nFinished job 3.\n")
    assert failed_patients([other]) == {}
    assert failed_patients(None) == {}


def test_failure_lines_name_patients_and_the_exclude_to_set(tmp_path):
    main = _snakemake_log(
        tmp_path,
        [
            ("register", "ERROR patient P7: /r/P7/nct.nii.gz: the image is constant\n"),
            ("split", "ERROR patient ?: /r/cohort.included.tsv: no PE patient in the test year\n"),
            ("convert", "ERROR patient P9: /d/P9: no series\n"),
        ],
    )
    assert failure_lines([main], exclude=["P1"]) == [
        "FAILED: /r/cohort.included.tsv: no PE patient in the test year",
        "FAILED after screening: patient P7: /r/P7/nct.nii.gz: the image is constant",
        "FAILED after screening: patient P9: /d/P9: no series",
        "2 patient(s) failed after screening. Fix the input, or leave them out: set cohort.exclude:"
        " [P1, P7, P9] in the config and run again; the jobs already done are kept.",
    ]
    assert failure_lines([], exclude=["P1"]) == []
