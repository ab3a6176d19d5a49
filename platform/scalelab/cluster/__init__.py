"""Local cluster and services (Ray head/workers, MLflow server, S3 server), job submission."""
