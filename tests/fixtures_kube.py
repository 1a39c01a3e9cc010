"""Kubernetes fixtures: KMock API emulator and the kopf operator running against it."""
