"""Studies: many runs of the pipeline on DVC's experiment queue or a Dask cluster, summarized with
honest statistics.

grid.py (what to run, validated before anything starts) -> queue.py (dvc exp run --queue, dvc queue
start, progress, dead workers) or cluster.py (Dask: local:N, a scheduler, dask-jobqueue; each run a
task.py task on a worker, started through supervise.py) -> record.py (what was launched and what
became of each run) -> experiments.py (dvc exp show --json) -> summary.py (groups, means, t
intervals, paired differences) -> report.py (summary.md, summary.csv, figures); cli.py is
`vitcnn study`.
"""
