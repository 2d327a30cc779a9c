"""The generated report: the paper's findings, measured on one model's grid of autoencoders
and, across models, on one base-config MLSAE each.

`write_report` reads a warehouse filled by the pipeline (tables, sql/ views, saved
autoencoders, training summaries, the pipeline's figures) and writes report.md with
its PNG figures into one self-contained directory, in three steps, one module each:

    facts.py     the only reader: sql/ views (each query shown beside its table),
                 training summaries, weights, activation caches -> one NamedTuple per section
    verdicts.py  pure functions facts -> verdicts, every threshold a named constant
    sections.py  (facts, verdicts) -> Markdown and figures, no database access

Nothing is typed in by hand, so a rerun on a new model yields a new report; the
prose of the findings is fixed text chosen by the verdicts and says so.
"""

from mlsae.report.builder import LEDGER_NAME, REPORT_NAME, ReportOutput, record_run, write_report
from mlsae.report.facts import SETTLE_FRACTION, TrainingFacts, count_parameters, training_facts
from mlsae.report.inputs import GridEntry, ModelEntry, ReportInputs
from mlsae.report.markdown import FIGURE_DIR
from mlsae.report.verdicts import PAPER_ORDER, PAPER_RATIO

__all__ = [
    "FIGURE_DIR", "LEDGER_NAME", "PAPER_ORDER", "PAPER_RATIO", "REPORT_NAME", "SETTLE_FRACTION",
    "GridEntry", "ModelEntry", "ReportInputs", "ReportOutput", "TrainingFacts",
    "count_parameters", "record_run", "training_facts", "write_report",
]
