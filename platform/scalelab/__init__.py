"""scalelab: multi-scale ResNet experiment platform.

Layers, lowest first; a module imports only from lower layers (tests/unit/test_layering.py holds it):

    errors                      what a user is told when something is wrong
    config                      typed specs, recipe loading, runtime settings (SCALELAB_*), model variants
    cluster.session             the one Ray session: .scalelab/stack.json, token auth, connect_ray
    models -> artifacts         networks; model bundles, Predictor and preprocessing built on them
    data -> tracking -> train   datasets; MLflow logging; the training loop and Ray Train assembly
    tune | registry | cluster   searches; register/promote; `scalelab up/down` and Ray jobs;
    | predict                   batch inference on Ray Data (`scalelab predict`)
    serve -> pipeline -> cli    Ray Serve; the whole path of one model; the command line
"""

__version__ = "0.1.0"
