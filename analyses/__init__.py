"""Analyses over stored archives: numbers (summary.json, CSV) and figures (PNG, SVG) in the
Hydra run directory.  They read archives through `engine.archive` and reduce rows with
`kernels`; none loads a language model.

Each module here but `__main__` and `protocol` is one analysis, declared against
`analyses.protocol.Analysis` and listed in `analyses.protocol.NAMES`; its config is
`conf/analysis/<name>.yaml`.  Shared helpers live in `analyses.lib`."""
