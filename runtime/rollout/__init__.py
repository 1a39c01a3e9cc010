"""The rollout side of a FlowRun: ``worker`` (``flowlane rollout``) turns questions into scored
trajectories on one inference engine and streams them to the learner."""
