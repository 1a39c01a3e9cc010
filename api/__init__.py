"""The single source of truth for flowlane's resources: FlowRun/FlowService models and gRPC protos."""
