"""Leader election among controller replicas through a coordination.k8s.io/v1 Lease.

The algorithm of client-go's ``leaderelection`` package, reduced to what kvroute needs:

- The Lease names a holder, a duration and the holder's last renew time. The holder
  renews every ``retry_period``; a candidate takes the lease once it has seen the same
  record, unchanged, for ``lease_duration`` by its *own* clock. Judging expiry by when the
  record was observed, not by the ``renewTime`` written with the holder's clock, keeps
  clock skew between nodes out of the decision.
- Every write carries the ``resourceVersion`` that was read, so two candidates that both
  see an expired lease cannot both win: the API server answers the slower one with
  ``409 Conflict``.
- A leader that cannot renew for ``renew_deadline`` (< ``lease_duration``) stops leading
  before anyone else may start, so two controllers never publish snapshots at once.
- :meth:`LeaderElector.release` empties the holder on a clean shutdown so a successor
  takes over at its next attempt instead of waiting out the lease.

:func:`decide` is the pure part; :class:`LeaderElector` does the API calls (the sync
client) and runs the loop in a thread.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import threading
import time
from collections.abc import Callable
from typing import Literal

import kubernetes
import urllib3

log = logging.getLogger(__name__)

Action = Literal["create", "take", "renew", "wait"]


@dataclasses.dataclass(frozen=True)
class Record:
    """The parts of a Lease that leader election reads."""

    holder: str | None
    duration: int | None  # leaseDurationSeconds
    transitions: int
    acquire_time: datetime.datetime | None
    renew_time: datetime.datetime | None
    resource_version: str | None

    def identity(self) -> tuple[object, ...]:
        """What changes whenever the holder renews or changes (the observed state)."""
        return (self.holder, self.renew_time, self.acquire_time, self.transitions)


def decide(
    record: Record | None,
    me: str,
    *,
    now: float,
    observed_at: float,
    default_duration: float,
) -> Action:
    """What a candidate should do with the lease it just read.

    ``observed_at`` is when (on the ``now`` clock) this record was first seen unchanged.
    """
    if record is None:
        return "create"
    if record.holder == me:
        return "renew"
    if not record.holder:
        return "take"  # released
    duration = record.duration if record.duration and record.duration > 0 else default_duration
    if now >= observed_at + duration:
        return "take"
    return "wait"


@dataclasses.dataclass(frozen=True)
class Config:
    namespace: str
    name: str  # the Lease's name, e.g. "kvroute-controller"
    identity: str  # this replica, e.g. the pod name
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0

    def __post_init__(self) -> None:
        if not (self.namespace and self.name and self.identity):
            raise ValueError("Config: namespace, name and identity must not be empty")
        if not 0 < self.retry_period < self.renew_deadline < self.lease_duration:
            raise ValueError(
                "Config: need 0 < retry_period < renew_deadline < lease_duration, got "
                f"{self.retry_period}, {self.renew_deadline}, {self.lease_duration}"
            )


class LeaderElector:
    """Campaigns for one Lease. ``on_change(True|False)`` is called from the election
    thread when leadership starts or stops (keep it short)."""

    def __init__(
        self,
        api: kubernetes.client.ApiClient,
        config: Config,
        *,
        on_change: Callable[[bool], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(datetime.UTC),
    ) -> None:
        self.config = config
        self._api = kubernetes.client.CoordinationV1Api(api)
        self._on_change = on_change
        self._clock = clock
        self._wall = wall_clock
        self._observed: tuple[tuple[object, ...], float] | None = None
        self._last_renew: float | None = None  # when this replica last held it for sure
        self._leading = False
        self._held_by_other = False  # the last read showed another holder
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def is_leader(self) -> bool:
        return self._leading

    def try_acquire_or_renew(self) -> bool:
        """One round: read the lease, then create, take or renew it if due. Returns
        whether this replica leads afterwards. API failures count as not renewed."""
        now = self._clock()
        try:
            ok = self._round(now)
        except (kubernetes.client.ApiException, urllib3.exceptions.HTTPError, OSError) as exc:
            log.warning("leader election %s: %s", self.config.name, _describe(exc))
            ok = False
        if ok:
            self._last_renew = now
            self._set_leading(True)
        elif self._leading and (
            self._held_by_other
            or self._last_renew is None
            or now - self._last_renew >= self.config.renew_deadline
        ):
            # Someone else holds it, or it may soon expire for the others: stop first.
            self._set_leading(False)
        return self._leading

    def _round(self, now: float) -> bool:
        cfg = self.config
        record: Record | None = None
        lease: kubernetes.client.V1Lease | None = None
        try:
            lease = self._api.read_namespaced_lease(
                cfg.name, cfg.namespace, _request_timeout=cfg.retry_period
            )
        except kubernetes.client.ApiException as exc:
            if exc.status != 404:
                raise
        self._held_by_other = False
        if lease is not None:
            record = _record(lease)
            self._held_by_other = record.holder not in (None, cfg.identity)
            if self._observed is None or self._observed[0] != record.identity():
                self._observed = (record.identity(), now)
        observed_at = self._observed[1] if self._observed else now
        action = decide(
            record,
            cfg.identity,
            now=now,
            observed_at=observed_at,
            default_duration=cfg.lease_duration,
        )
        if action == "wait":
            return False
        stamp = self._wall()
        if action == "create":
            spec = kubernetes.client.V1LeaseSpec(
                holder_identity=cfg.identity,
                lease_duration_seconds=round(cfg.lease_duration),
                acquire_time=stamp,
                renew_time=stamp,
                lease_transitions=0,
            )
            body = kubernetes.client.V1Lease(
                metadata=kubernetes.client.V1ObjectMeta(name=cfg.name, namespace=cfg.namespace),
                spec=spec,
            )
            return self._write(lambda: self._api.create_namespaced_lease(cfg.namespace, body))
        assert record is not None and lease is not None
        taking = action == "take"
        spec = kubernetes.client.V1LeaseSpec(
            holder_identity=cfg.identity,
            lease_duration_seconds=round(cfg.lease_duration),
            acquire_time=stamp if taking else record.acquire_time,
            renew_time=stamp,
            lease_transitions=record.transitions + (1 if taking else 0),
        )
        body = kubernetes.client.V1Lease(
            metadata=kubernetes.client.V1ObjectMeta(
                name=cfg.name,
                namespace=cfg.namespace,
                resource_version=record.resource_version,
                labels=lease.metadata.labels if lease.metadata else None,
                annotations=lease.metadata.annotations if lease.metadata else None,
            ),
            spec=spec,
        )
        if taking:
            log.info("leader election %s: taking the lease from %r", cfg.name, record.holder)
        return self._write(
            lambda: self._api.replace_namespaced_lease(cfg.name, cfg.namespace, body)
        )

    def _write(self, call: Callable[[], object]) -> bool:
        try:
            call()
        except kubernetes.client.ApiException as exc:
            if exc.status == 409:  # someone else wrote first: read again next round
                log.info("leader election %s: lost a race (409 Conflict)", self.config.name)
                return False
            raise
        return True

    def release(self) -> None:
        """Give the lease up now if this replica holds it (clean shutdown)."""
        cfg = self.config
        if not self._leading:
            return
        self._set_leading(False)
        try:
            lease = self._api.read_namespaced_lease(
                cfg.name, cfg.namespace, _request_timeout=cfg.retry_period
            )
            record = _record(lease)
            if record.holder != cfg.identity:
                return
            body = kubernetes.client.V1Lease(
                metadata=kubernetes.client.V1ObjectMeta(
                    name=cfg.name, namespace=cfg.namespace, resource_version=record.resource_version
                ),
                spec=kubernetes.client.V1LeaseSpec(
                    holder_identity=None,
                    lease_duration_seconds=1,
                    acquire_time=record.acquire_time,
                    renew_time=self._wall(),
                    lease_transitions=record.transitions,
                ),
            )
            self._write(lambda: self._api.replace_namespaced_lease(cfg.name, cfg.namespace, body))
        except (kubernetes.client.ApiException, urllib3.exceptions.HTTPError, OSError) as exc:
            log.warning("leader election %s: release failed: %s", cfg.name, _describe(exc))

    def start(self) -> None:
        """Campaign in a thread until :meth:`close`."""
        if self._thread is not None:
            raise RuntimeError("LeaderElector already started")
        self._thread = threading.Thread(target=self._loop, name="kvroute-leader", daemon=True)
        self._thread.start()

    def close(self, release: bool = True, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if release:
            self.release()
        else:
            self._set_leading(False)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.try_acquire_or_renew()
            self._stop.wait(self.config.retry_period)

    def _set_leading(self, leading: bool) -> None:
        if leading == self._leading:
            return
        self._leading = leading
        log.info(
            "leader election %s: %s %s",
            self.config.name,
            self.config.identity,
            "started leading" if leading else "stopped leading",
        )
        if self._on_change is not None:
            self._on_change(leading)


def _record(lease: kubernetes.client.V1Lease) -> Record:
    spec = lease.spec or kubernetes.client.V1LeaseSpec()
    meta = lease.metadata or kubernetes.client.V1ObjectMeta()
    return Record(
        holder=spec.holder_identity or None,
        duration=spec.lease_duration_seconds,
        transitions=spec.lease_transitions or 0,
        acquire_time=spec.acquire_time,
        renew_time=spec.renew_time,
        resource_version=meta.resource_version,
    )


def _describe(exc: Exception) -> str:
    if isinstance(exc, kubernetes.client.ApiException):
        return f"API error {exc.status} {exc.reason}"
    return f"{type(exc).__name__}: {exc}"
