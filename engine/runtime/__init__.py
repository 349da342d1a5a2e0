"""The machinery the verbs share, below them and above the archive: model sources
(`models`, `builds`, `compat`), the sampling loop with its logits hook (`sampling`),
teacher forcing (`teacher`), the run's self-check (`selfcheck`), moving rows to the host and
encoding them (`overlap`, `encode`), prompts and provenance, typed settings (`settings`),
output planning and the one write lifecycle (`output`), the batch schedule (`schedule`) and
the sampling run itself (`run`).  Imports torch; the archive package below it does not."""
