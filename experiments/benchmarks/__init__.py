"""The benchmark's measured pieces, one section per module; ``experiments/bench.py`` runs them and writes the report.

``steps`` (1, step cost), ``fill`` (2, the budgeted fill), ``scale`` (3, an ImageNet-size cache), ``remote`` (4, the
fill through RemoteTeacher), ``extraction`` (5), ``cuda`` (6, GPU model pairs); ``common`` (statistics, timing,
machine) and ``report`` (goals, markdown).
"""
