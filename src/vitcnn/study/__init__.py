"""Studies: many runs of the pipeline on DVC's experiment queue, summarized with honest statistics.

grid.py (what to run, validated before queuing) -> queue.py (dvc exp run --queue, dvc queue
start, progress) -> experiments.py (dvc exp show --json) -> summary.py (groups, means, t
intervals, paired differences) -> report.py (summary.md, summary.csv, figures); cli.py is
`vitcnn study`.
"""
