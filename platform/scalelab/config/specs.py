"""Typed specs, one per concern, composed under :class:`RecipeSpec`.

Every field is documented where it is declared; recipes in ``pipelines/*.yaml`` are validated
against these classes, so an unknown key or a wrong type is an error that names the key.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from scalelab.config.variants import variant_config


class _Spec(BaseModel):
    # Unknown keys are errors: a typo in a recipe must never be silently ignored.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class ModelSpec(_Spec):
    """Architecture of a multi-scale ResNet (classifier or detector)."""

    variant: str | None = Field(
        None,
        description="Registered variant to start from (see `scalelab models`); "
        "fields given beside it override the variant's values.",
    )
    task: Literal["classification", "detection"] = Field(
        "classification", description="Classifier head or FPN detection head."
    )
    stem: Literal["small", "large", "auto"] = Field(
        "auto",
        description="'small': 3x3 conv, no downsampling (8-32 px images); 'large': 7x7/2 conv + "
        "max-pool (ImageNet-style); 'auto': small below 64 px.",
    )
    stem_width: int = Field(32, ge=4, description="Output channels of the stem.")
    depths: list[int] = Field([1, 1, 1], description="Blocks per stage.")
    widths: list[int] = Field([64, 128, 256], description="Output channels per stage.")
    bottleneck_ratio: float = Field(
        0.5,
        gt=0,
        le=4,
        description="Inner (3x3 path) width = stage width x this ratio, unless width_per_scale is set.",
    )
    width_per_scale: int | None = Field(
        None, ge=1, description="Channels of each split; inner width = width_per_scale x scales."
    )
    scales: int = Field(
        4, ge=1, description="Res2Net splits of the 3x3 path; 1 is exactly a plain bottleneck block."
    )
    kernel_sizes: list[int] = Field(
        [3], description="Kernel sizes cycled across the splits (e.g. [3, 5] for mixed kernels)."
    )
    split_dilation: bool | list[int] = Field(
        False,
        description="Dilation of the splits' kxk convolutions. true: growing dilation 1, 2, 3, ... along "
        "the Res2Net chain (a larger receptive field on 7x7/14x14 maps at the same parameters and "
        "FLOPs); a list: dilations cycled across the splits like kernel_sizes; false: all 1. No "
        "effect with scales=1 (one split, dilation 1).",
    )
    pyramid_stem: bool = Field(
        False,
        description="Multi-resolution stem: the image and its half-size pyramid level (2x2 average "
        "pool) each get a 3x3 conv; the half-size branch is resized to the stem's output and added.",
    )
    se: bool = Field(False, description="Squeeze-and-excitation channel attention in each block.")
    se_ratio: float = Field(0.25, gt=0, le=1, description="SE bottleneck ratio.")
    depthwise: bool = Field(False, description="Depthwise-separable convolutions in the split paths.")
    head: Literal["last", "mean_logits", "concat", "weighted"] = Field(
        "mean_logits",
        description="Multi-scale classifier fusion: last stage only, mean of per-stage logits, "
        "one classifier over concatenated pooled features, or 'weighted': per-stage logits fused "
        "with learned softmax weights (one scalar per head stage, starting equal).",
    )
    head_stages: list[int] = Field(
        [-2, -1], description="Stages (indices, negative from the end) that feed the head."
    )
    aux_weight: float = Field(
        0.3, ge=0, description="Weight of the auxiliary (side-head) losses during training."
    )
    drop_rate: float = Field(0.0, ge=0, lt=1, description="Dropout before the classifier(s).")
    test_time_flip: bool = Field(
        False,
        description="Classifier: in eval mode, average the logits of each image and its mirror image "
        "(test-time augmentation for left-right symmetric data; doubles inference cost). Part of the "
        "model, so evaluation, serving and the exported model all do it.",
    )
    fpn_width: int = Field(64, ge=8, description="Detection: FPN channels.")
    fpn_levels: list[int] = Field(
        [0, 1, 2], description="Detection: backbone stages (indices) feeding the FPN."
    )
    fpn_fusion: Literal["sum", "weighted"] = Field(
        "sum",
        description="Detection: how the FPN's top-down path merges a level with the upsampled coarser "
        "one. 'sum': plain addition; 'weighted': learned softmax weights per merge (two scalars, "
        "starting equal; EfficientDet's weighted fusion, the FPN's analogue of head: weighted).",
    )

    @model_validator(mode="before")
    @classmethod
    def _start_from_variant(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("variant"):
            merged = dict(variant_config(data["variant"]))
            merged.update({k: v for k, v in data.items()})
            return merged
        return data

    @model_validator(mode="after")
    def _check_shapes(self) -> ModelSpec:
        if len(self.depths) != len(self.widths):
            raise ValueError(f"depths {self.depths} and widths {self.widths} must have one entry per stage")
        if not self.depths or any(d < 1 for d in self.depths):
            raise ValueError(f"depths must be >= 1 per stage, got {self.depths}")
        if any(w < 1 for w in self.widths):
            raise ValueError(f"widths must be positive, got {self.widths}")
        if isinstance(self.split_dilation, list) and (
            not self.split_dilation or any(d < 1 for d in self.split_dilation)
        ):
            raise ValueError(
                f"split_dilation must be true/false or a list of dilations >= 1, got {self.split_dilation}"
            )
        if any(k < 1 or k % 2 == 0 for k in self.kernel_sizes) or not self.kernel_sizes:
            raise ValueError(f"kernel_sizes must be odd and >= 1, got {self.kernel_sizes}")
        for w in self.widths:
            inner = self.inner_width(w)
            if inner % self.scales:
                raise ValueError(
                    f"inner width {inner} (stage width {w} x bottleneck_ratio {self.bottleneck_ratio}) "
                    f"is not divisible by scales={self.scales}; pick widths that are multiples of "
                    f"{self.scales}/{self.bottleneck_ratio} or set width_per_scale"
                )
        if self.test_time_flip and self.task == "detection":
            raise ValueError("test_time_flip is for classifiers; a detector's boxes would need un-flipping")
        n = len(self.depths)
        for idx in [*self.head_stages, *self.fpn_levels]:
            if not -n <= idx < n:
                raise ValueError(f"stage index {idx} out of range for {n} stages")
        return self

    def split_dilations(self) -> tuple[int, ...]:
        """Dilations cycled across a block's splits (``split_dilation`` resolved)."""
        if self.split_dilation is True:
            return tuple(range(1, max(2, self.scales)))  # one per convolved split: 1, 2, ..., s-1
        if self.split_dilation is False:
            return (1,)
        return tuple(self.split_dilation)

    def inner_width(self, stage_width: int) -> int:
        """Channels of the 3x3 (split) path of a block in a stage of this width."""
        if self.width_per_scale is not None:
            return self.width_per_scale * self.scales
        return max(1, round(stage_width * self.bottleneck_ratio))


class AugmentSpec(_Spec):
    """Tensor-level augmentation, applied on the fly to training batches only."""

    crop_padding: int = Field(0, ge=0, description="Random crop after zero-padding by this many px.")
    hflip: bool = Field(False, description="Random horizontal flip (never for digits).")
    random_erasing: float = Field(0.0, ge=0, le=1, description="Probability of random erasing.")
    rescale: list[float] | None = Field(
        None,
        description="Mixed-resolution training: [low, high]; each image is resampled by a factor drawn "
        "from that range (below 1: downsampled and resized back; above 1: enlarged and centre-cropped), "
        "e.g. [0.5, 1.0]. None: off.",
    )

    @field_validator("rescale")
    @classmethod
    def _check_rescale(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and (len(v) != 2 or not 0 < v[0] <= v[1] <= 4):
            raise ValueError(f"rescale must be [low, high] with 0 < low <= high <= 4, got {v}")
        return v


class DataSpec(_Spec):
    """Which dataset, how it is split, and where its prepared copy lives."""

    name: str = Field("digits", description="Dataset name (the folder under data_dir).")
    kind: Literal["digits", "fashion-mnist", "imagefolder", "npz", "scenes", "coco"] = Field(
        "digits", description="Catalog entry that reads the raw data."
    )
    source: str | None = Field(
        None, description="Raw data path (imagefolder root, npz file, IDX folder, COCO json)."
    )
    data_dir: str = Field("data", description="Where prepared datasets are written (DVC-tracked).")
    image_size: int | None = Field(
        None, ge=4, description="Resize images to this square size when preparing (None: keep)."
    )
    channels: Literal[1, 3] | None = Field(
        None, description="Force grayscale (1) or RGB (3); None keeps the dataset's own."
    )
    val_fraction: float = Field(0.1, ge=0, lt=1, description="Share of training data for validation.")
    test_fraction: float = Field(
        0.2, gt=0, lt=1, description="Share held out for test, where the dataset has no test split."
    )
    split_seed: int = Field(0, description="Seed of the stratified split (changes the data version).")
    on_bad_file: Literal["error", "skip"] = Field(
        "error", description="Imagefolder and COCO: stop at an unreadable image, or skip and count it."
    )
    format: Literal["auto", "memory", "stream"] = Field(
        "auto",
        description="Prepared form. 'memory': one uint8 array per split ({train,val,test}.npz), loaded "
        "whole by every worker. 'stream': Parquet shards of encoded images streamed to the workers by "
        "Ray Data (datasets larger than memory). 'auto': memory when the decoded train split takes at "
        "most half of memory_budget_mb, stream otherwise (the choice and reason are printed and logged).",
    )
    memory_budget_mb: int | None = Field(
        None,
        ge=1,
        description="Memory one training worker may spend on data (None: a quarter of this machine's "
        "memory). 'auto' prepares a train split larger than half of it as shards; training refuses an "
        "in-memory dataset larger than it, or than train.memory_per_worker_mb.",
    )
    shard_mb: float = Field(
        128.0, gt=0, description="Stream format: target size of one Parquet shard, in MB of encoded images."
    )
    row_group_rows: int = Field(
        256, ge=1, description="Stream format: rows per Parquet row group (the unit a reader fetches)."
    )
    shuffle_window: int = Field(
        8,
        ge=1,
        description="Stream format: row groups mixed per shuffle window. Each epoch permutes the row "
        "groups (seeded by train.seed + epoch), then the samples within each window of this many groups.",
    )
    stream_from: Literal["local", "remote"] = Field(
        "local",
        description="Stream format: read shards from the prepared folder ('local'), or straight from "
        "the DVC remote's objects of the recorded version ('remote': S3, nothing downloaded first; "
        "the folder need not exist on any node, only its .dvc/dvc.lock entry).",
    )
    stream_object_store_mb: int | None = Field(
        None,
        ge=1,
        description="Stream format, Ray Train workers: the most Ray object-store memory one worker's "
        "Ray Data reader may fill with decoded windows ahead of training (Ray Data's "
        "execution_options.resource_limits: it stops launching decode tasks above it; a soft bound, "
        "at least one window). The worker maps these blocks zero-copy, so this also bounds its shared "
        "resident pages. None: Ray Data's default, half of the node's object store.",
    )
    read_retry_s: float = Field(
        120.0,
        ge=0,
        description="Stream format, shards on S3: how long a read keeps retrying while the store does "
        "not answer (backoff 0.5 s doubling to 8 s) before training fails with an error naming the "
        "endpoint. Running the same command again then resumes from the last checkpoint.",
    )
    endpoint_url: str | None = Field(
        None,
        description="S3-compatible endpoint for an s3:// data.source (None: $AWS_ENDPOINT_URL_S3, "
        "$AWS_ENDPOINT_URL, the default DVC remote's endpointurl, or AWS itself).",
    )
    augment: AugmentSpec = Field(default_factory=AugmentSpec)
    scenes: dict[str, Any] = Field(
        default_factory=dict, description="Detection scene generator options (kind 'scenes')."
    )

    @model_validator(mode="after")
    def _check_fractions(self) -> DataSpec:
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must be < 1")
        return self


class TrainSpec(_Spec):
    """Optimisation, precision, distribution and checkpointing of one training run."""

    epochs: int = Field(30, ge=1, description="Passes over the training split.")
    batch_size: int = Field(
        128,
        ge=1,
        description="Global batch size. With N workers each takes batch_size / (N x grad_accum) "
        "per step, so the optimisation is the same whatever N is.",
    )
    grad_accum_steps: int = Field(1, ge=1, description="Micro-batches accumulated per optimiser step.")
    optimizer: Literal["sgd", "adamw"] = Field("sgd", description="Optimiser.")
    lr: float = Field(0.1, gt=0, description="Peak learning rate (for the global batch size).")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum (Nesterov).")
    weight_decay: float = Field(5e-4, ge=0, description="Decoupled (AdamW) or L2 (SGD) weight decay.")
    schedule: Literal["cosine", "onecycle", "constant"] = Field(
        "onecycle", description="Learning-rate schedule, stepped every optimiser step."
    )
    warmup_epochs: float = Field(1.0, ge=0, description="Linear warm-up (cosine schedule only).")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="Cross-entropy label smoothing.")
    seed: int = Field(0, description="Seeds torch, numpy and Python; same seed, same run.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="'auto': bf16 autocast on CUDA with bf16 support, or on a CPU with AMX-BF16; "
        "fp32 elsewhere.",
    )
    channels_last: bool | None = Field(
        None, description="channels_last memory format; None: on whenever bf16 is used."
    )
    workers: int = Field(0, ge=0, description="Ray Train workers; 0 runs the loop in-process.")
    use_gpu: bool = Field(False, description="One GPU per worker (NCCL); CPU + gloo otherwise.")
    cpus_per_worker: float = Field(1, gt=0, description="CPUs reserved per Ray Train worker.")
    memory_per_worker_mb: int | None = Field(
        None,
        ge=1,
        description="Memory Ray reserves for each Ray Train worker (its 'memory' resource, in MB; None: "
        "none reserved). Also caps the data a worker may hold: an in-memory dataset larger than this "
        "(or than data.memory_budget_mb) is refused before training starts.",
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="How Ray places the workers on nodes."
    )
    threads: int | None = Field(None, ge=1, description="torch intra-op threads (None: all CPUs).")
    checkpoint_every: int = Field(1, ge=1, description="Epochs between checkpoints.")
    checkpoint_every_steps: int | None = Field(
        None,
        ge=1,
        description="Also checkpoint every this many optimiser steps within an epoch (None: only at "
        "epoch ends). A run resumed from such a checkpoint continues the epoch at the exact sample "
        "where it stopped, in the same order.",
    )
    num_to_keep: int = Field(2, ge=1, description="Checkpoints kept (best by val_acc).")
    max_failures: int = Field(2, ge=0, description="Worker-group restarts from the last checkpoint.")
    storage_path: str = Field(
        ".scalelab/runs", description="Checkpoints and run state: a folder or s3://bucket/prefix."
    )
    storage_endpoint: str | None = Field(
        None,
        description="S3-compatible endpoint URL (e.g. http://127.0.0.1:9000) for an s3:// storage_path; "
        "None: $AWS_ENDPOINT_URL_S3, $AWS_ENDPOINT_URL, or AWS itself.",
    )
    run_name: str | None = Field(
        None, description="Stable run name; running again with it resumes from its checkpoint."
    )
    output_dir: str = Field("outputs", description="Where the final model (safetensors + spec) goes.")


class TrackingSpec(_Spec):
    """Where runs are tracked."""

    uri: str | None = Field(
        None,
        description="MLflow tracking URI; None: $MLFLOW_TRACKING_URI, the running `scalelab up` "
        "stack, or sqlite:///.scalelab/mlflow.db.",
    )
    experiment: str = Field("scalelab", description="MLflow experiment name.")
    enabled: bool = Field(True, description="Log to MLflow at all.")
    flush_timeout_s: float = Field(
        60.0,
        ge=0,
        description="At the end of a run, how long to keep retrying log calls buffered while the "
        "tracking server was unreachable before warning that they are lost (and saving them locally).",
    )
    log_model: bool = Field(
        True, description="Also log the model with mlflow.pytorch.log_model (pt2), for `mlflow models`."
    )


class ParamSpace(_Spec):
    """One searched dimension: exactly one of the distributions."""

    choice: list[Any] | None = Field(None, description="Pick one of these values.")
    uniform: tuple[float, float] | None = Field(None, description="Uniform float in [low, high].")
    loguniform: tuple[float, float] | None = Field(None, description="Log-uniform in [low, high].")
    randint: tuple[int, int] | None = Field(None, description="Integer in [low, high).")

    @model_validator(mode="after")
    def _exactly_one(self) -> ParamSpace:
        given = [k for k in ("choice", "uniform", "loguniform", "randint") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of choice/uniform/loguniform/randint, got {given or 'none'}")
        if self.choice is not None and not self.choice:
            raise ValueError("choice must list at least one value")
        for k in ("uniform", "loguniform", "randint"):
            rng = getattr(self, k)
            if rng is not None and not rng[0] < rng[1]:
                raise ValueError(f"{k}: low {rng[0]} must be < high {rng[1]}")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError("loguniform: low must be > 0")
        return self


class SearchSpec(_Spec):
    """Ray Tune search over any recipe field (dotted keys)."""

    space: dict[str, ParamSpace] = Field(
        default_factory=dict, description="Dotted recipe key -> distribution, e.g. model.scales."
    )
    algorithm: Literal["optuna", "random", "grid"] = Field("optuna", description="Search algorithm.")
    scheduler: Literal["asha", "none"] = Field("asha", description="Early stopping of poor trials.")
    grace_period: int = Field(1, ge=1, description="ASHA: epochs before a trial can be stopped.")
    reduction_factor: float = Field(3, gt=1, description="ASHA: keep 1/this of trials per rung.")
    max_epochs: int | None = Field(None, ge=1, description="Epochs per trial (default: train.epochs).")
    num_samples: int = Field(8, ge=1, description="Trials to run (per grid point for grid).")
    max_concurrent_trials: int = Field(2, ge=1, description="Trials running at once.")
    seed: int = Field(0, description="Searcher seed.")
    metric: str = Field("val_acc", description="Metric to optimise.")
    mode: Literal["max", "min"] = Field("max", description="Maximise or minimise the metric.")
    max_params: int | None = Field(None, ge=1, description="Never launch configs with more params.")
    max_flops: int | None = Field(None, ge=1, description="Never launch configs with more FLOPs/image.")
    match: Literal["params", "flops", "none"] | None = Field(
        None,
        description="Keep every trial within +-5% of the base recipe's model budget (parameters or "
        "forward FLOPs per image) by scaling its stage widths, so searched shapes (scales, depths) "
        "compare at equal cost; the matched figure is a column of the results table. Default (null): "
        "'params' when model.scales is searched and no width key (model.widths, model.base_width) is, "
        "else 'none'.",
    )
    trial_mode: Literal["local", "workers"] = Field(
        "local", description="'local': loop in the trial process; 'workers': a TorchTrainer per trial."
    )
    cpus_per_trial: float = Field(1, gt=0, description="CPUs reserved per trial (local mode).")
    reuse_trial_processes: bool = Field(
        True,
        description="Local mode: a trial process that finished (or that ASHA stopped) runs the next "
        "trial, so torch and scalelab are imported once per process, not once per trial (Tune's "
        "reuse_actors). Off: a fresh process per trial.",
    )
    checkpoint_every: int | None = Field(
        None,
        ge=1,
        description="Epochs between a trial's checkpoints (the last epoch always checkpoints). None: "
        "ASHA's grace_period (every rung is a multiple of it, so a trial ASHA stops has a checkpoint "
        "of its last epoch), or the recipe's train.checkpoint_every without ASHA. An interrupted "
        "search resumes each unfinished trial from its last checkpoint; all are kept while the search "
        "runs, each trial's newest once it ends.",
    )
    channels_last: bool | None = Field(
        None,
        description="channels_last for the trials' training when the recipe leaves "
        "train.channels_last unset. None: on for CPU trials (~25-30% less CPU per epoch for fp32 on an "
        "AVX2 host, BENCHMARKS.md), as recipes with bf16 already do; the recipe's choice otherwise.",
    )
    output_dir: str = Field(".scalelab/tune", description="Results table, best.yaml, Tune state.")


class PromotionSpec(_Spec):
    """Registry name and the gate a candidate must pass to become @champion."""

    model_name: str | None = Field(None, description="Registered model name (default: recipe name).")
    min_accuracy: float = Field(0.9, ge=0, le=1, description="Absolute floor on test accuracy.")
    min_delta: float = Field(0.0, ge=0, description="Required test-accuracy gain over the champion.")
    latency_p95_ms: float = Field(50.0, gt=0, description="Budget for p95 single-image prediction.")
    smoke_images: int = Field(8, ge=0, description="Known test images that must be predicted right.")
    allow_unversioned_data: bool = Field(
        False,
        description="Promote a model trained on data no DVC file + git commit records (refused by "
        "default: nobody could fetch that data again to check or retrain it).",
    )


class ServeSpec(_Spec):
    """Ray Serve deployment of a registered model."""

    host: str = Field("127.0.0.1", description="HTTP bind address (loopback by default).")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port.")
    route_prefix: str = Field("/", description="Route prefix of the application.")
    num_replicas: int = Field(1, ge=1, description="Fixed replicas (ignored when autoscaling).")
    autoscaling: bool = Field(False, description="Autoscale between min and max replicas.")
    min_replicas: int = Field(1, ge=0, description="Autoscaling floor.")
    max_replicas: int = Field(2, ge=1, description="Autoscaling ceiling.")
    target_ongoing_requests: float = Field(8, gt=0, description="Autoscaling target per replica.")
    cpus_per_replica: float = Field(1, gt=0, description="CPUs per model replica.")
    gpus_per_replica: float = Field(0, ge=0, description="GPUs per model replica.")
    batching: bool = Field(
        True, description="Dynamic batching with @serve.batch; false runs each request on its own."
    )
    max_batch_size: int = Field(
        16,
        ge=1,
        description="Dynamic batching: largest batch. 16 is the cheapest per image on a CPU replica here "
        "(Fashion-MNIST msresnet_m, one thread: 5.1 ms CPU per image at 16, 6.3 at 32, 5.9 at 8) and keeps "
        "two batches in flight at 32 concurrent clients; GPU replicas want larger ones.",
    )
    batch_wait_timeout_s: float = Field(0.005, ge=0, description="Dynamic batching: wait for more.")
    max_ongoing_requests: int = Field(
        256,
        ge=1,
        description="Per replica; beyond it requests queue. A slow client holds one until the ingress's "
        "client timeout cuts it, so keep it above the slow connections the service must outlast.",
    )
    max_queued_requests: int = Field(256, ge=-1, description="Queue bound; beyond it a fast 503.")
    max_body_bytes: int = Field(8_000_000, ge=1024, description="Request body limit (413 above).")
    body_timeout_s: float = Field(
        30.0,
        gt=0,
        description="Whole-body deadline: a body not complete this long after the request started gets "
        "408 (a client trickling bytes resets the ingress's inactivity timeout, never this one).",
    )
    max_images: int = Field(64, ge=1, description="Images per request.")
    max_pixels: int = Field(16_000_000, ge=64, description="Pixels per image (decompression bombs).")
    top_k: int = Field(5, ge=1, description="Classes returned per image.")
    api_key_env: str = Field(
        "SCALELAB_API_KEY", description="Environment variable holding the API key (unset: no auth)."
    )
    poll_interval_s: float = Field(5.0, gt=0, description="How often the registry alias is polled.")
    app_name: str | None = Field(None, description="Serve application name (default: scalelab-<model>).")
    access_log: bool = Field(True, description="Ray Serve's per-request access log in the replicas.")
    image: str = Field(
        "ghcr.io/scalelab/scalelab:0.1.0-gpu",
        description="Container image (scalelab installed) for the RayService manifest.",
    )


class RecipeSpec(_Spec):
    """A whole recipe: data, model, training, tracking, search, promotion, serving."""

    name: str = Field("digits", description="Recipe name; used for run and model names.")
    description: str = Field("", description="Shown in the registry and reports.")
    data: DataSpec = Field(default_factory=DataSpec)
    model: ModelSpec = Field(default_factory=ModelSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    search: SearchSpec = Field(default_factory=SearchSpec)
    promotion: PromotionSpec = Field(default_factory=PromotionSpec)
    serve: ServeSpec = Field(default_factory=ServeSpec)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not v or not all(c.isalnum() or c in "-_." for c in v):
            raise ValueError(f"name {v!r} may only hold letters, digits, '-', '_' and '.'")
        return v


class JobResources(_Spec):
    """Resources reserved for the job's entrypoint (the driver), not for its Ray Train workers."""

    num_cpus: float = Field(1, ge=0, description="CPUs for the entrypoint process.")
    num_gpus: float = Field(0, ge=0, description="GPUs for the entrypoint process.")
    memory_gb: float | None = Field(None, gt=0, description="Memory for the entrypoint (GiB).")


class JobRuntimeEnv(_Spec):
    """Ray runtime environment of the job."""

    working_dir: str | None = Field(".", description="Uploaded to the cluster; None: use the image's copy.")
    excludes: list[str] = Field(
        default_factory=lambda: [
            "/.venv",
            "/.git",
            "/.scalelab",
            "/outputs",
            "/reports",
            "/data",
            "/.dvc/cache",
            "*.egg-info",
            "__pycache__",
            ".pytest_cache",
            ".ruff_cache",
        ],
        description="Paths left out of the uploaded working dir (gitignore syntax; '/x' = top-level x).",
    )
    env_vars: dict[str, str] = Field(default_factory=dict, description="Environment of the job.")
    pip: list[str] = Field(default_factory=list, description="Extra pip packages installed for the job.")


class ClusterSettings(_Spec):
    """Cluster-level settings, turned into recipe overrides at submission."""

    workers: int | None = Field(None, ge=0, description="Ray Train workers (train.workers).")
    gpus_per_worker: float = Field(0, ge=0, description="GPUs per training worker (train.use_gpu if > 0).")
    cpus_per_worker: float | None = Field(None, gt=0, description="CPUs per training worker.")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] | None = Field(
        None, description="Placement of the training workers across nodes."
    )
    storage_path: str | None = Field(
        None, description="Checkpoint storage shared by all nodes (s3://... or a shared file system)."
    )


class JobSpec(_Spec):
    """A cluster job: which scalelab verb on which recipe, with what environment and resources."""

    name: str = Field(..., description="Job name, used in the submission id.")
    verb: Literal["train", "tune", "pipeline", "serve", "data", "evaluate", "predict"] = Field(
        ..., description="The scalelab verb the job runs."
    )
    args: list[str] = Field(
        default_factory=list,
        description="Arguments of the verb before the recipe (e.g. ['run'] for pipeline).",
    )
    recipe: str | None = Field(None, description="Recipe path, relative to the working dir.")
    overrides: list[str] = Field(default_factory=list, description="Dotted recipe overrides.")
    runtime_env: JobRuntimeEnv = Field(default_factory=JobRuntimeEnv)
    resources: JobResources = Field(default_factory=JobResources)
    cluster: ClusterSettings = Field(default_factory=ClusterSettings)
    submission_id: str = Field(
        "scalelab-{name}-{timestamp}",
        description="Pattern of the Ray submission id; {name}, {timestamp}, {user} are filled in.",
    )
    python: str | None = Field(
        None,
        description="The cluster's Python; None: the one `scalelab up` recorded, else `python` on the "
        "node's PATH (a container image's own interpreter).",
    )
