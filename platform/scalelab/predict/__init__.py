"""Batch inference: ``scalelab predict`` scores a folder, an S3 prefix or a dataset version on Ray Data.

Beside ``tune``, ``registry`` and ``cluster`` in the layers: it reads models through
``tracking.bundles`` (the lookup Serve uses), images through ``artifacts.preprocess`` (the
server's decoding) and datasets through ``data``; it imports neither ``serve`` nor ``registry``.

- ``sources``: what SOURCE names (image folder, ``s3://bucket/prefix``, a prepared dataset
  version) listed on the driver, with clear errors for an empty folder or an unreachable S3.
- ``replica``: :class:`PredictReplica`, the callable class Ray Data runs as an actor pool: one
  ``Predictor`` per actor (a GPU each when the cluster has them), decoding and scoring a batch.
- ``batch``: sizing the pool to the cluster, running ``map_batches``, streaming the results into
  one Parquet file with a progress bar, and the summary (images/s, accuracy, bad files).
- ``commands``: the ``scalelab predict`` verb.
"""
