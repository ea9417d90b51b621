"""Deployments and desired states, in the `Fleet` facade: the rules, each device's signed document, its refresh.
Mixed into `Fleet`.

Theory: the database is the source of truth. A deployment is stored as a rule (a model version for one device, a
device class, or a label key=value); a device's desired models are computed from all rules in the order made, so a
later rule for the same model name overrides an earlier one, and a device that enrolls after a class or label
deployment gets it too (a rule that reaches no device yet is kept, and `fleet deploy` says so). Whenever a device's
desired models may have changed (deploy, enroll) or its document nears expiry, `_resign` computes the models, bumps
the device's generation, signs the document with expiry now + `desired_state_ttl_s`, stores it
(`Store.commit_desired`, which refuses when rules changed meanwhile, so a slow writer cannot overwrite a newer
document) and then publishes it. Publishing is best effort: an agent also fetches its document over HTTP when it
(re)connects.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING

from edgefleet.cloud.errors import CloudError, NotFound, Unavailable
from edgefleet.protos.api import BundleView, DeploymentView, DeployRequest
from edgefleet.protos.messages import DesiredModel, DesiredState, ModelBudgets, SignedDesiredState

if TYPE_CHECKING:
    from edgefleet.cloud.db.models import Bundle, Deployment, Device, ModelVersion
    from edgefleet.cloud.settings import Settings
    from edgefleet.cloud.store import Store
    from edgefleet.cloud.trust import DesiredStateSigner
    from edgefleet.protos.messages import DeviceClassInfo

log = logging.getLogger(__name__)

Publish = Callable[[str, SignedDesiredState], None]
# 5: a document is recomputed only when a deployment or re-enrollment lands between computing and committing it.
RESIGN_TRIES = 5


def _now() -> datetime:
    # Whole seconds: the signed payload then reads the same in every JSON round trip and log line.
    return datetime.now(timezone.utc).replace(microsecond=0)


class DeployFacade:
    """Needs `settings`, `store`, `signer`, `publish`, `_publish_lock`, `_signed_with`, `count()`, `_class()`,
    `_classes()`, `_device()` and `_ensure_bundle()` from `Fleet`."""

    if TYPE_CHECKING:
        settings: Settings
        store: Store
        signer: DesiredStateSigner
        publish: Publish | None
        _publish_lock: threading.Lock
        _signed_with: frozenset[str] | None

        def count(self, name: str, by: int = 1) -> None: ...
        def _class(self, name: str) -> DeviceClassInfo: ...
        def _classes(self) -> dict[str, DeviceClassInfo]: ...
        def _device(self, device_id: str) -> Device: ...
        def _ensure_bundle(self, model: ModelVersion, cls: DeviceClassInfo) -> Bundle: ...

    # ------------------------------------------------------------------------------------------------ deployments

    def deploy(self, req: DeployRequest) -> DeploymentView:
        model = self.store.get_model_version(req.model, req.version)
        if model is None:
            if req.version is None or self.store.get_model_version(req.model) is None:
                raise NotFound(f"no model {req.model!r}; push it first (`fleet models push`) or check `fleet models`")
            raise NotFound(f"model {req.model!r} has no version {req.version}; `fleet models show {req.model}` lists "
                           "its versions")
        if req.device_id:
            kind, target = "device", req.device_id
            devices = [self._device(req.device_id)]
            classes = [self._class(devices[0].device_class)]
        elif req.device_class:
            kind, target = "device_class", req.device_class
            classes = [self._class(req.device_class)]
            devices = self.store.list_devices(req.device_class)
        else:
            kind, target = "label", str(req.label)
            key, _, value = target.partition("=")
            devices = [d for d in self.store.list_devices() if d.labels.get(key) == value]
            names = sorted({d.device_class for d in devices})
            classes = [self._class(n) for n in names]
        # Build every bundle before recording the rule: a class the model cannot run on fails the whole deploy.
        bundles = [self._ensure_bundle(model, c) for c in classes]
        row = self.store.add_deployment(model=model.name, version=model.version, target_kind=kind, target=target,
                                        device_ids=[d.device_id for d in devices],
                                        bundle_ids=[b.id for b in bundles], now=_now(), p95_ms=req.p95_ms,
                                        mj_per_inference=req.mj_per_inference)
        self.count("deployments")
        for device in devices:
            self._resign(device.device_id)
        return _deployment_view(row, sorted(d.device_id for d in devices), bundles)

    def list_deployments(self) -> list[DeploymentView]:
        return [_deployment_view(r, devs, bundles) for r, devs, bundles in self.store.list_deployments()]

    def _desired_models(self, device: Device, rules: list[Deployment]) -> list[DesiredModel]:
        wanted: dict[str, tuple[int, ModelBudgets | None]] = {}
        for rule in rules:  # in the order made: a later rule for the same model name wins, budgets included
            if (
                (rule.target_kind == "device" and rule.target == device.device_id)
                or (rule.target_kind == "device_class" and rule.target == device.device_class)
                or (rule.target_kind == "label" and _label_matches(rule.target, device.labels))
            ):
                wanted[rule.model] = (rule.version, ModelBudgets.from_ms_mj(rule.p95_ms, rule.mj_per_inference))
        cls = self._classes().get(device.device_class)
        models: list[DesiredModel] = []
        for name, (version, budgets) in sorted(wanted.items()):
            row = self.store.get_model_version(name, version)
            if row is None or cls is None:
                continue
            try:
                bundle = self._ensure_bundle(row, cls)
            except CloudError as exc:
                # A label rule can reach a class it was never built for; the device keeps its other models.
                log.warning("device %s: %s", device.device_id, exc)
                self.count("bundle_build_failed")
                continue
            runtime = (bundle.manifest or {}).get("runtime", "onnxruntime")  # the agent checks it against the bundle
            models.append(DesiredModel(name=name, version=version, bundle_target=bundle.target_path, runtime=runtime,
                                       budgets=budgets))
        return models

    def _resign(self, device_id: str) -> SignedDesiredState:
        """Compute, sign, store and publish a new document for the device (a new generation)."""
        for _ in range(RESIGN_TRIES):
            device = self._device(device_id)
            rules, mark = self.store.deployment_rules()
            models = self._desired_models(device, rules)
            signed: list[SignedDesiredState] = []

            # Called by commit_desired before this iteration ends, so the loop variables it reads are this device's.
            def make_doc(generation: int) -> tuple[dict, datetime]:
                now = _now()
                state = DesiredState(device_id=device.device_id,  # noqa: B023
                                     device_class=device.device_class,  # noqa: B023
                                     generation=generation, issued_at=now,
                                     expires_at=now + timedelta(seconds=self.settings.desired_state_ttl_s),
                                     models=models)  # noqa: B023
                signed.append(self.signer.sign(state))  # noqa: B023
                return signed[-1].to_dict(), state.expires_at  # noqa: B023

            with self._publish_lock:
                generation = self.store.commit_desired(device_id, rules_mark=mark, device_class=device.device_class,
                                                       labels=device.labels, make_doc=make_doc)
                if generation is None:
                    continue
                self._publish(device_id, signed[-1])
            return signed[-1]
        raise Unavailable(f"desired state of {device_id} kept changing while it was being signed; retry")

    def _publish(self, device_id: str, doc: SignedDesiredState) -> None:
        if self.publish is None:
            return
        try:
            self.publish(device_id, doc)
        except Exception as exc:  # noqa: BLE001 - the DB holds the doc; the agent fetches it over HTTP on connect
            log.warning("publishing the desired state of %s failed: %s", device_id, exc)
            self.count("publish_failed")

    def desired_state(self, device_id: str) -> SignedDesiredState:
        device = self._device(device_id)
        if device.desired_doc is None or device.desired_expires_at is None or (
            device.desired_expires_at - _now() < timedelta(seconds=self.settings.desired_state_ttl_s / 2)
        ):
            return self._resign(device_id)
        return SignedDesiredState.model_validate(device.desired_doc)

    def refresh_expiring(self) -> int:
        """Re-sign (and publish) every document past half its life, and, after the desired-state keys changed (a
        rotation step, maybe by `edgefleet-cloud keys` in another process), every one not signed by exactly them;
        the number re-signed."""
        cutoff = _now() + timedelta(seconds=self.settings.desired_state_ttl_s / 2)
        due = self.store.devices_expiring_before(cutoff)
        signing = self.signer.signing_keyids()
        if signing != self._signed_with:
            stale = [d.device_id for d in self.store.list_devices() if not _signed_by_exactly(d.desired_doc, signing)]
            due = sorted(set(due) | set(stale))
        done = 0
        for device_id in due:
            self._resign(device_id)
            done += 1
        self._signed_with = signing
        return done


# ---------------------------------------------------------------------------------------------------- views


def _signed_by_exactly(doc: dict | None, keyids: frozenset[str]) -> bool:
    """Whether a stored signed desired state is signed by `keyids` and no other key (after a finished rotation, a
    document still signed by the revoked key is re-signed, so agents see the new key alone and learn the revocation)."""
    return doc is not None and keyids == {s.get("keyid") for s in doc.get("signatures", [])}


def _label_matches(rule: str, labels: dict[str, str]) -> bool:
    key, _, value = rule.partition("=")
    return labels.get(key) == value


def _bundle_view(row: Bundle) -> BundleView:
    return BundleView(model=row.model, version=row.version, device_class=row.device_class,
                      target_path=row.target_path, sha256=row.sha256, size_bytes=row.size_bytes,
                      created_at=row.created_at)


def _deployment_view(row: Deployment, devices: list[str], bundles: list[Bundle]) -> DeploymentView:
    return DeploymentView(id=row.id, model=row.model, version=row.version, target_kind=row.target_kind,
                          target=row.target, created_at=row.created_at, devices=devices,
                          bundles=[_bundle_view(b) for b in bundles], p95_ms=row.p95_ms,
                          mj_per_inference=row.mj_per_inference)


__all__ = ["RESIGN_TRIES", "DeployFacade", "Publish"]
