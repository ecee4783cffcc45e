"""Discovery from Kubernetes: Services and discovery.k8s.io/v1 EndpointSlices.

The official client is synchronous (urllib3), so each resource kind gets one reflector
thread doing what client-go's reflector does:

1. list (paged), remember the list's ``resourceVersion``, replace the kind's objects;
2. watch from that version; every event moves the remembered version forward, and
   BOOKMARK events (asked for) move it without a change;
3. a watch that ends (the server's ``timeoutSeconds``, a dropped connection, an error
   status) is opened again from the remembered version, so nothing is missed or replayed;
4. ``410 Gone`` (the version was compacted away, as an ERROR event or an HTTP status)
   means the history is lost: list again (step 1).

Errors back off exponentially (with jitter) and never end the thread. The raw objects are
kept as JSON dicts; :func:`controller.discovery.k8sobjects.build` turns them into specs.

:meth:`KubernetesDiscovery.watch` bridges to asyncio: the threads wake the event loop
(``call_soon_threadsafe``), and it yields the full list once both kinds have been listed,
then after every change (debounced) that alters the result. :meth:`close` stops and joins
the threads: it interrupts a watch by shutting its socket down.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import threading
import time
from collections.abc import AsyncGenerator, Callable, Iterator, Mapping
from typing import Any

import kubernetes
import urllib3

from controller.discovery import discovered, k8sobjects

log = logging.getLogger(__name__)

SERVICES = "services"
ENDPOINT_SLICES = "endpointslices"
KINDS = (SERVICES, ENDPOINT_SLICES)

_GONE = 410


@dataclasses.dataclass(frozen=True)
class Settings:
    namespace: str | None = None  # None: every namespace
    label_selector: str | None = None  # applies to Services; slices are joined to them
    annotated_only: bool = False  # beside kube-proxy: only kvroute.io/-annotated Services
    watch_timeout: int = 300  # seconds the server keeps one watch open (timeoutSeconds)
    request_timeout: float = 30.0  # connect timeout, and read timeout of list calls
    page_size: int = 500  # list page size (limit/continue)
    debounce: float = 0.1  # seconds to gather a burst of events into one update
    backoff_initial: float = 0.5
    backoff_max: float = 30.0

    def __post_init__(self) -> None:
        if self.namespace is not None and not self.namespace:
            raise ValueError("Settings.namespace must be None (all) or a namespace name")
        if self.watch_timeout < 1 or self.page_size < 1:
            raise ValueError("Settings.watch_timeout and page_size must be >= 1")
        if not (self.request_timeout > 0 and self.debounce >= 0 and self.backoff_initial > 0):
            raise ValueError("Settings: timeouts and back-off must be positive")
        if self.backoff_max < self.backoff_initial:
            raise ValueError("Settings.backoff_max must be >= backoff_initial")


def api_client(
    kubeconfig: str | None = None, context: str | None = None
) -> kubernetes.client.ApiClient:
    """A client from ``kubeconfig`` (or ``$KUBECONFIG``/``~/.kube/config``), or the pod's
    service account when running in a cluster and no kubeconfig is given."""
    if kubeconfig is None and context is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        cfg = kubernetes.client.Configuration()
        kubernetes.config.load_incluster_config(client_configuration=cfg)
        return kubernetes.client.ApiClient(cfg)
    return kubernetes.config.new_client_from_config(config_file=kubeconfig, context=context)


class _Store:
    """Raw objects per kind, shared by the reflector threads and the readers."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.objects: dict[str, dict[tuple[str, str], dict[str, Any]]] = {k: {} for k in KINDS}
        self.synced: set[str] = set()
        self.generation = 0
        self._listeners: list[Callable[[], None]] = []

    def subscribe(self, fn: Callable[[], None]) -> None:
        with self.lock:
            self._listeners.append(fn)

    def unsubscribe(self, fn: Callable[[], None]) -> None:
        with self.lock, contextlib.suppress(ValueError):
            self._listeners.remove(fn)

    def replace(self, kind: str, items: list[Any]) -> None:
        fresh = {}
        for obj in items:
            key = k8sobjects.object_key(obj)
            if key is None:
                log.warning("kubernetes discovery: ignoring a listed %s without a name", kind)
                continue
            fresh[key] = obj
        with self.lock:
            self.objects[kind] = fresh
            self.synced.add(kind)
        self._changed()

    def apply(self, kind: str, event_type: str, obj: Any) -> None:
        key = k8sobjects.object_key(obj)
        if key is None:
            log.warning("kubernetes discovery: ignoring a %s event without a name", kind)
            return
        with self.lock:
            if event_type == "DELETED":
                self.objects[kind].pop(key, None)
            else:
                self.objects[kind][key] = obj
        self._changed()

    def _changed(self) -> None:
        with self.lock:
            self.generation += 1
            listeners = list(self._listeners)
        for fn in listeners:
            fn()


class _Gone(Exception):
    """The remembered resourceVersion is too old: list again."""


class _Reflector:
    """List + watch of one kind, in its own thread."""

    def __init__(
        self,
        kind: str,
        api: kubernetes.client.ApiClient,
        settings: Settings,
        store: _Store,
        stop: threading.Event,
    ) -> None:
        self.kind = kind
        self.settings = settings
        self.store = store
        self.stop = stop
        self.resource_version: str | None = None
        self._watch: kubernetes.watch.Watch | None = None
        self._watch_lock = threading.Lock()
        self._list_fn, self._kwargs = _endpoints(kind, api, settings)
        self.thread = threading.Thread(target=self._run, name=f"kvroute-k8s-{kind}", daemon=True)

    def interrupt(self) -> None:
        """Unblock a watch in progress (its socket is shut down)."""
        with self._watch_lock:
            if self._watch is not None:
                self._watch.stop()

    def _run(self) -> None:
        delay = self.settings.backoff_initial
        listed_at = -math.inf
        while not self.stop.is_set():
            try:
                if self.resource_version is None:
                    items, self.resource_version = self._list()
                    listed_at = time.monotonic()
                    self.store.replace(self.kind, items)
                    log.info(
                        "kubernetes discovery: listed %d %s at resourceVersion %s",
                        len(items),
                        self.kind,
                        self.resource_version,
                    )
                started = time.monotonic()
                events = self._watch_once()
                if events or time.monotonic() - started >= 1.0:
                    delay = self.settings.backoff_initial
                    continue
                # An empty watch that ended at once: a server misbehaving, do not spin.
                reason = "watch ended at once without events"
            except (_Gone, kubernetes.client.ApiException) as exc:
                if isinstance(exc, kubernetes.client.ApiException) and exc.status != _GONE:
                    reason = f"API error {exc.status} {exc.reason}"
                else:
                    self.resource_version = None
                    if time.monotonic() - listed_at >= 1.0:
                        log.info("kubernetes discovery: %s: 410 Gone; listing again", self.kind)
                        continue
                    # Expired right after a fresh list: relist, but not in a tight loop.
                    reason = "410 Gone right after a list"
            except (urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
                reason = f"{type(exc).__name__}: {exc}"
            except Exception as exc:  # the thread must outlive any surprise
                log.exception("kubernetes discovery: %s: unexpected error", self.kind)
                reason = repr(exc)
            if self.stop.is_set():
                break
            pause = delay * random.uniform(0.8, 1.2)
            log.warning(
                "kubernetes discovery: %s: %s; retrying in %.2fs from resourceVersion %s",
                self.kind,
                reason,
                pause,
                self.resource_version,
            )
            self.stop.wait(pause)
            delay = min(delay * 2, self.settings.backoff_max)

    def _list(self) -> tuple[list[Any], str]:
        items: list[Any] = []
        token: str | None = None
        while True:
            resp = self._list_fn(
                **self._kwargs,
                limit=self.settings.page_size,
                _continue=token,
                _preload_content=False,
                _request_timeout=self.settings.request_timeout,
            )
            try:
                body = json.loads(resp.data)
            finally:
                resp.release_conn()
            if not isinstance(body, dict) or not isinstance(body.get("items") or [], list):
                raise ValueError(f"list of {self.kind} is not a list object")
            items.extend(body.get("items") or [])
            meta = body.get("metadata") or {}
            token = meta.get("continue") or None
            if token is None:
                version = meta.get("resourceVersion")
                if not isinstance(version, str) or not version:
                    raise ValueError(f"list of {self.kind} has no resourceVersion")
                return items, version

    def _watch_once(self) -> int:
        """One watch request from the remembered version; returns how many events came."""
        assert self.resource_version is not None
        # return_type "object" keeps events as plain dicts (see k8sobjects for why) while
        # the client still turns ERROR events into exceptions.
        watch = kubernetes.watch.Watch(return_type="object")
        with self._watch_lock:
            if self.stop.is_set():
                return 0
            self._watch = watch
        count = 0
        try:
            stream = watch.stream(
                self._list_fn,
                **self._kwargs,
                resource_version=self.resource_version,
                allow_watch_bookmarks=True,
                # With timeout_seconds the client makes exactly one request and leaves
                # reconnecting (and 410 handling) to this loop.
                timeout_seconds=self.settings.watch_timeout,
                _request_timeout=(
                    self.settings.request_timeout,
                    self.settings.watch_timeout + self.settings.request_timeout,
                ),
            )
            for event in _events(stream):
                if self.stop.is_set():
                    break
                count += 1
                self._handle(event)
        except kubernetes.client.ApiException as exc:
            if exc.status == _GONE:
                raise _Gone(f"watch from resourceVersion {self.resource_version} expired") from None
            raise
        except (urllib3.exceptions.HTTPError, OSError):
            if self.stop.is_set():
                return count  # the socket was shut down by close()
            raise
        finally:
            with self._watch_lock:
                self._watch = None
        return count

    def _handle(self, event: Mapping[str, Any]) -> None:
        kind_of_event = event.get("type")
        obj = event.get("raw_object")
        if not isinstance(obj, dict):
            log.warning("kubernetes discovery: %s: event without an object ignored", self.kind)
            return
        version = (obj.get("metadata") or {}).get("resourceVersion")
        if kind_of_event in ("ADDED", "MODIFIED", "DELETED"):
            self.store.apply(self.kind, kind_of_event, obj)
        elif kind_of_event != "BOOKMARK":
            log.warning("kubernetes discovery: %s: unknown event %r", self.kind, kind_of_event)
        if isinstance(version, str) and version:
            self.resource_version = version


def _events(stream: Iterator[Any]) -> Iterator[Mapping[str, Any]]:
    # The client yields None for a line that is not JSON; skip those.
    for event in stream:
        if isinstance(event, dict):
            yield event


def _endpoints(
    kind: str, api: kubernetes.client.ApiClient, settings: Settings
) -> tuple[Callable[..., Any], dict[str, Any]]:
    kwargs: dict[str, Any] = {}
    if kind == SERVICES:
        core = kubernetes.client.CoreV1Api(api)
        if settings.label_selector:
            kwargs["label_selector"] = settings.label_selector
        if settings.namespace is None:
            return core.list_service_for_all_namespaces, kwargs
        return core.list_namespaced_service, {"namespace": settings.namespace, **kwargs}
    disc = kubernetes.client.DiscoveryV1Api(api)
    # Service labels are not reliably copied to slices (mirrored and custom ones), so the
    # selector stays on services; the existence selector just skips unowned slices.
    kwargs["label_selector"] = k8sobjects.SERVICE_NAME_LABEL
    if settings.namespace is None:
        return disc.list_endpoint_slice_for_all_namespaces, kwargs
    return disc.list_namespaced_endpoint_slice, {"namespace": settings.namespace, **kwargs}


class KubernetesDiscovery:
    """Services and their endpoints from the API server, kept current by watches.

    Use as a context manager (or call :meth:`start` and :meth:`close`). :meth:`watch`
    starts the threads itself if needed; :meth:`close` must still be called.
    """

    def __init__(self, api: kubernetes.client.ApiClient, settings: Settings | None = None) -> None:
        self.api = api
        self.settings = settings or Settings()
        self._store = _Store()
        self._stop = threading.Event()
        self._reflectors = [
            _Reflector(kind, api, self.settings, self._store, self._stop) for kind in KINDS
        ]
        self._started = False
        self._build_lock = threading.Lock()
        self._cache: tuple[int, list[discovered.ServiceSpec]] | None = None
        self._noted: set[str] = set()

    def __enter__(self) -> KubernetesDiscovery:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        if self._stop.is_set():
            raise RuntimeError("KubernetesDiscovery was closed")
        if not self._started:
            self._started = True
            for r in self._reflectors:
                r.thread.start()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the threads and wait for them (at most ``timeout`` seconds)."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        for r in self._reflectors:
            if not self._started:
                break
            # Interrupt repeatedly: a watch may open between a check and the interrupt.
            while r.thread.is_alive() and time.monotonic() < deadline:
                r.interrupt()
                r.thread.join(0.05)
            if r.thread.is_alive():
                log.warning("kubernetes discovery: %s thread did not stop in time", r.kind)

    @property
    def synced(self) -> bool:
        """True once both kinds have been listed at least once."""
        with self._store.lock:
            return len(self._store.synced) == len(KINDS)

    def wait_synced(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.synced:
            if time.monotonic() >= deadline or self._stop.is_set():
                return False
            time.sleep(0.01)
        return True

    def resource_versions(self) -> dict[str, str | None]:
        """The version each kind would resume from (for tests and status pages)."""
        return {r.kind: r.resource_version for r in self._reflectors}

    def snapshot(self) -> list[discovered.ServiceSpec]:
        """The current view. Before :attr:`synced` it may lack a kind's objects."""
        with self._store.lock:
            generation = self._store.generation
            services = list(self._store.objects[SERVICES].values())
            slices = list(self._store.objects[ENDPOINT_SLICES].values())
        with self._build_lock:
            if self._cache is not None and self._cache[0] == generation:
                return list(self._cache[1])
            result = k8sobjects.build(services, slices, self.settings.annotated_only)
            notes = set(result.notes)
            for note in result.notes:
                if note not in self._noted:
                    log.warning("kubernetes discovery: %s", note)
            self._noted = notes  # a note that goes away and comes back is logged again
            self._cache = (generation, result.specs)
            return list(result.specs)

    async def watch(self) -> AsyncGenerator[list[discovered.ServiceSpec], None]:
        """Yield the full list once both kinds are listed, then after each change."""
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()

        def notify() -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed under us
                loop.call_soon_threadsafe(wake.set)

        self._store.subscribe(notify)
        try:
            self.start()
            last: list[discovered.ServiceSpec] | None = None
            wake.set()  # look once now: the store may be synced already
            while True:
                await wake.wait()
                if self.settings.debounce:
                    await asyncio.sleep(self.settings.debounce)
                wake.clear()
                if not self.synced:
                    continue  # half a view would drop every endpoint of every service
                current = self.snapshot()
                if current != last:
                    last = current
                    yield list(current)
        finally:
            self._store.unsubscribe(notify)
