"""Promote a version to @champion through the gate, or roll @champion back; every attempt is recorded.

Order of a promotion: lock -> read champion -> download + verify both bundles -> gate -> re-read
champion and the lock -> move the alias -> record -> unlock. Nothing moves before every check has
passed, so a crash anywhere leaves the old champion in place (and a lock that expires).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scalelab.artifacts.predictor import Predictor
from scalelab.config.specs import PromotionSpec
from scalelab.errors import RegistryError, ScalelabError
from scalelab.registry.gate import evaluate_gate
from scalelab.registry.history import PromotionLock, previous_champion, read_history, record_attempt
from scalelab.registry.store import CHAMPION, champion
from scalelab.tracking.bundles import fetch_version_bundle, get_model, get_version, resolve_version


@dataclass
class PromotionOutcome:
    name: str
    candidate: str
    previous: str | None
    decision: str  # promoted | refused | would-promote | would-refuse | unchanged
    reasons: list[str]
    numbers: dict[str, Any] = field(default_factory=dict)

    @property
    def moved(self) -> bool:
        return self.decision == "promoted"


def load_version(client, mv, workdir: Path) -> Predictor:
    path = fetch_version_bundle(client, mv, workdir / f"v{mv.version}")
    return Predictor.from_bundle(
        path, {"name": mv.name, "version": str(mv.version), "run_id": mv.run_id, "tags": dict(mv.tags or {})}
    )


def policy_for(predictor: Predictor, overrides: dict[str, Any] | None = None) -> PromotionSpec:
    """The candidate's own recipe's policy (per pipeline), with explicit overrides on top."""
    base = (predictor.meta.get("recipe") or {}).get("promotion") or {}
    merged = {**base, **{k: v for k, v in (overrides or {}).items() if v is not None}}
    try:
        return PromotionSpec.model_validate(merged)
    except Exception as exc:  # noqa: BLE001
        raise RegistryError(f"invalid promotion policy {merged}: {exc}") from None


def promote(
    client,
    name: str,
    version: str | int | None = None,
    alias: str | None = None,
    policy: dict[str, Any] | None = None,
    dry_run: bool = False,
    lock_timeout_s: float = 300.0,
) -> PromotionOutcome:
    get_model(client, name)
    candidate_mv = resolve_version(client, name, version, alias)
    cand = str(candidate_mv.version)
    with PromotionLock(client, name, timeout_s=lock_timeout_s) as lock:
        champ_mv = champion(client, name)
        prev = str(champ_mv.version) if champ_mv else None
        entry: dict[str, Any] = {"action": "promote", "from": prev, "to": cand, "dry_run": dry_run}
        if prev == cand:
            outcome = PromotionOutcome(
                name, cand, prev, "unchanged", [f"version {cand} is already @{CHAMPION}"]
            )
            record_attempt(client, name, {**entry, "decision": "unchanged", "reasons": outcome.reasons})
            return outcome
        try:
            with tempfile.TemporaryDirectory(prefix="scalelab-promote-") as tmp:
                cand_pred = load_version(client, candidate_mv, Path(tmp))
                champ_pred = load_version(client, champ_mv, Path(tmp)) if champ_mv else None
                rules = policy_for(cand_pred, policy)
                gate = evaluate_gate(
                    cand_pred,
                    champ_pred,
                    rules,
                    expected_fingerprint=(champ_mv or candidate_mv).tags.get("data.test_sha256"),
                )
        except ScalelabError as exc:
            record_attempt(client, name, {**entry, "decision": "error", "reasons": [str(exc)]})
            raise
        decision = (
            ("would-promote" if gate.passed else "would-refuse")
            if dry_run
            else ("promoted" if gate.passed else "refused")
        )
        if decision == "promoted":
            now = champion(client, name)
            if (str(now.version) if now else None) != prev or not lock.still_held():
                decision = "refused"
                gate.reasons.append(
                    f"@{CHAMPION} moved to v{now.version if now else None} while the gate ran "
                    f"(lock broken as "
                    f"stale?); nothing moved, run the promotion again"
                )
            else:
                client.set_registered_model_alias(name, CHAMPION, cand)
        record_attempt(
            client,
            name,
            {
                **entry,
                "decision": decision,
                "reasons": gate.reasons,
                "numbers": gate.numbers,
                "policy": rules.model_dump(),
            },
        )
        return PromotionOutcome(name, cand, prev, decision, gate.reasons, gate.numbers)


def rollback(
    client, name: str, to_version: str | int | None = None, lock_timeout_s: float = 300.0
) -> PromotionOutcome:
    """Move @champion back to the version it replaced (or to ``to_version``), after verifying its weights."""
    get_model(client, name)
    with PromotionLock(client, name, timeout_s=lock_timeout_s):
        champ_mv = champion(client, name)
        if champ_mv is None:
            raise RegistryError(f"model {name!r} has no @{CHAMPION}: nothing to roll back")
        current = str(champ_mv.version)
        target = (
            str(to_version)
            if to_version is not None
            else previous_champion(read_history(client, name), current)
        )
        if target is None:
            raise RegistryError(
                f"no previous champion of {name!r} is recorded before v{current}; "
                f"pass --to VERSION explicitly"
            )
        target_mv = get_version(client, name, target)
        entry = {"action": "rollback", "from": current, "to": target, "dry_run": False}
        try:
            with tempfile.TemporaryDirectory(prefix="scalelab-rollback-") as tmp:
                fetch_version_bundle(client, target_mv, tmp)  # never roll back onto tampered weights
        except ScalelabError as exc:
            record_attempt(client, name, {**entry, "decision": "error", "reasons": [str(exc)]})
            raise
        client.set_registered_model_alias(name, CHAMPION, target)
        reasons = [f"@{CHAMPION} rolled back from v{current} to v{target}"]
        record_attempt(client, name, {**entry, "decision": "rolled-back", "reasons": reasons})
        return PromotionOutcome(name, target, current, "rolled-back", reasons)
