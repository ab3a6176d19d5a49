"""What a replica is told through ``user_config``; changing it reconfigures replicas in place."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from scalelab.config.specs import ServeSpec


class ReplicaConfig(BaseModel):
    """The deployment's ``user_config``: which model, and the per-request limits and batching."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model_name: str | None = Field(None, description="Registered model to serve.")
    alias: str | None = Field("champion", description="Alias followed (watched) when no version is pinned.")
    version: str | None = Field(None, description="Pinned version (no watching); None follows the alias.")
    bundle_path: str | None = Field(None, description="Serve a local bundle folder instead of the registry.")
    tracking_uri: str | None = Field(None, description="MLflow URI of the registry.")
    poll_interval_s: float = Field(5.0, gt=0, description="How often the alias is polled.")
    batching: bool = Field(True, description="Dynamic batching on (@serve.batch) or off.")
    max_batch_size: int = Field(16, ge=1)
    batch_wait_timeout_s: float = Field(0.005, ge=0)
    max_body_bytes: int = Field(8_000_000, ge=1024)
    body_timeout_s: float = Field(30.0, gt=0)
    max_images: int = Field(64, ge=1)
    max_pixels: int = Field(16_000_000, ge=64)
    top_k: int = Field(5, ge=1)
    threads: int = Field(1, ge=1, description="torch threads per replica (its CPU budget).")
    api_key_sha256: str | None = Field(None, description="sha256 of the API key; never the key itself.")
    api_key_env: str = Field(
        "SCALELAB_API_KEY", description="Env var read in the replica when no hash is set."
    )


def key_sha256(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def replica_config(
    spec: ServeSpec,
    model_name: str | None,
    alias: str | None = "champion",
    version: str | None = None,
    tracking_uri: str | None = None,
    bundle_path: str | None = None,
    include_key: bool = True,
) -> ReplicaConfig:
    """Build the user_config from the recipe's ServeSpec; the API key is read here and only hashed."""
    key = os.environ.get(spec.api_key_env) if include_key else None
    return ReplicaConfig(
        model_name=model_name,
        alias=None if version else alias,
        version=version,
        # absolute: replicas run in another working directory
        bundle_path=str(Path(bundle_path).resolve()) if bundle_path else None,
        tracking_uri=tracking_uri,
        poll_interval_s=spec.poll_interval_s,
        batching=spec.batching,
        max_batch_size=spec.max_batch_size,
        batch_wait_timeout_s=spec.batch_wait_timeout_s,
        max_body_bytes=spec.max_body_bytes,
        body_timeout_s=spec.body_timeout_s,
        max_images=spec.max_images,
        max_pixels=spec.max_pixels,
        top_k=spec.top_k,
        threads=max(1, int(spec.cpus_per_replica)),
        api_key_sha256=key_sha256(key) if key else None,
        api_key_env=spec.api_key_env,
    )
