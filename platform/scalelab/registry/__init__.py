"""Model registry on MLflow aliases: register runs, promote through a gate, roll back, history.

Import from the submodules (``registry.register``, ``registry.promote``, ``registry.store``;
bundle lookups are ``tracking.bundles``); this package stays import-light so the CLI starts fast.
"""
