"""The learning half: Flow-GRPO math, the learner engine, checkpoints and experiment tracking."""
