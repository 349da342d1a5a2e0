# Makes engine/conf a package, so Hydra finds the groups the analyses share (paths/,
# hydra/launcher/) through analyses/conf/analyses.yaml's `hydra.searchpath: [pkg://engine.conf]`.
