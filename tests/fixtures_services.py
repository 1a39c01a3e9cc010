"""External service fixtures (S3 via moto server, MLflow server, KMock)."""
