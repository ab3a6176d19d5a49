"""Ray Serve serving of registered models: app (FastAPI ingress), preprocessing, deploy configs.

Import from the submodules; this package stays import-light (``serve.app`` imports Ray).
"""
