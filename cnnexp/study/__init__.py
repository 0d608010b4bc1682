"""Sweep stage: Optuna studies over search spaces or designs written in `sweeps/*.yaml`.

`space` reads a sweep file, `design` its designed cells, `study` opens the Optuna study,
`objective` runs one trial, `engine` loops until the study is done, `budget` plans the compute,
`workers` runs many processes; `python -m cnnexp.sweep` is the CLI (`__main__`).
"""
