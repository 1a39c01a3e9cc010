"""Low-level kits the rollout side (``flowlane.runtime``) and the learning side (``flowlane.trainer``)
both build on, kept below both so neither imports the other: S3 access (``s3``), the checkpoint
store that writes and reads ``file://`` and ``s3://`` checkpoints (``checkpoints``), model
provisioning from names, paths and checkpoints (``models``), merging a LoRA checkpoint into its
base model (``lora``), the gRPC wire helpers (``grpc_common``), the task sets (``tasks``), MLflow
tracking (``tracking``) and the one logging setup every process uses (``logs``).

It is a layer of its own, not part of ``flowlane.api``: ``api`` is what every image installs (the
operator's carries no torch) and what the CRDs are generated from, while some of these kits need the
learner and rollout extras (minio, safetensors, torch, peft). The folder sits inside ``flowlane/``
so it needs no packaging change; import-linter's layer contract (pyproject.toml) keeps it below
``runtime`` and ``trainer`` and above ``api``.
"""
