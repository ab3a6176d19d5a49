"""The registry's own names on top of ``tracking.bundles``: the @champion alias and promotion history."""

from __future__ import annotations

from scalelab.tracking.bundles import get_model

CHAMPION = "champion"
HISTORY_PREFIX = "scalelab.history."


def champion(client, name: str):
    """The version at @champion, or None when nothing was promoted yet."""
    model = get_model(client, name)
    version = (model.aliases or {}).get(CHAMPION)
    return client.get_model_version(name, str(version)) if version is not None else None
