"""Analyses over stored archives: numbers (summary.json, CSV) and figures (PNG, SVG) in the
Hydra run directory.  They read archives through `engine.archive` and reduce rows with
`kernels`; none loads a language model."""
