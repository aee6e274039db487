"""Studies: the paper's controlled comparisons as one command (`ldae study`).

spec.py says what a study and a budget are and resolves every run's settings before anything runs; runner.py
plans and runs the child `ldae pretrain` / `ldae probe` processes; results.py reads their numbers back and
compares each row with its reference over paired seeds; patchspace.py measures the patch space of the data;
pages.py writes results.json, results.md and results.png from all of it.
"""
