"""Model artifacts and inference: what a trained model is on disk and how anything runs it.

Above ``models/`` and ``config/``, below ``data/``, ``tracking/``, ``train/``, ``tune/``,
``registry/`` and ``serve/``: it imports none of them.

- ``bundle``: the bundle format (``model.safetensors`` + ``model.json``, sha256 checked) with the
  fully resolved model spec, so a bundle loads whatever happens to the variant registry later.
- ``hardware``: CPU features (AVX512-BF16, AMX) and the autocast precision, for training and inference.
- ``preprocess``: client images -> uint8 arrays -> the normalised tensor (the bundle's mean/std).
- ``predictor``: ``Predictor``, a loaded bundle that classifies or detects (Serve, gate, batch).
- ``evaluate``: the one evaluation (classifier accuracy/confusion, detector COCO mAP) used by
  training, ``scalelab evaluate``, the search's best-trial check and the promotion gate.

Bundles kept in MLflow (a run's ``bundle/``, registered versions with verified weights) are found
by ``tracking.bundles``, which the registry and Serve share.
"""
