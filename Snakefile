# cpmn-pe: the CPMN study (Bai, Zhou et al.) from raw dual-phase DICOM, or the synthetic cohort, to Table 1,
# Table 2 and Fig. 2. Wiring only: every rule runs a `cpmn` subcommand; the logic lives in cpmn/.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


include: "workflow/rules/common.smk"


wildcard_constraints:
    patient=r"[A-Za-z0-9_.-]+",
    variant="|".join(VARIANTS),
    split="train|val|test",


include: "workflow/rules/cohort.smk"
include: "workflow/rules/convert.smk"
include: "workflow/rules/register.smk"
include: "workflow/rules/preprocess.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/infer.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/card.smk"
include: "workflow/rules/fumpe.smk"


rule all:
    default_target: True
    input:
        final_outputs(),


onsuccess:
    print_exclusions()


onerror:
    print_exclusions()
    print_failure_hint(log)
