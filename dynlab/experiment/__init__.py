"""Studies as experiments: a grid of conditions × seeds from one file (`studyfile`), run
anywhere (`runner`), and the study's claims judged across seeds (`claims`, on the pure
statistics of `stats`).

    study = load_study("configs/study/mini.yaml")
    run_study(study, "study_out", jobs=2)
    table = judge(observe(open_store("study_out/analysis.zarr"), read_design("study_out")),
                  read_design("study_out"))
"""

from dynlab.experiment.claims import judge, observe
from dynlab.experiment.runner import read_design, run_study
from dynlab.experiment.studyfile import load_study

__all__ = ["judge", "load_study", "observe", "read_design", "run_study"]
