"""The kopf operator and the local backend: both place a FlowRun's process graph."""
