"""The node agent: owns the programs and maps, applies desired state.

Desired state comes from a YAML file for now (reloaded on change or SIGHUP);
the controller stream (issue 4) will sit beside it. The agent is stateless:
everything it needs to diff lives in the pinned maps, so it can be killed at
any moment and a new one picks up where it left off, while the attached
programs keep routing.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path
from types import FrameType

from dataplane import apply, config, loader
from dataplane.maps import MapSet
from dataplane.settings import Settings

log = logging.getLogger("kvroute.agent")


class Agent:
    def __init__(self, settings: Settings, cgroup: Path, config_path: Path,
                 ready_file: Path | None = None) -> None:
        self.settings = settings
        self.cgroup = cgroup
        self.config_path = config_path
        self.ready_file = ready_file
        self.stop_event = threading.Event()
        self.reload_event = threading.Event()
        self._mtime: float | None = None
        self.maps: MapSet | None = None
        self.datapath: loader.Datapath | None = None
        self.applier: apply.Applier | None = None

    def start(self) -> None:
        # Validate the desired state before touching the kernel: a bad file at
        # start changes nothing.
        desired = config.load_file(self.config_path)
        started = time.perf_counter()
        self.datapath = loader.Datapath(self.settings)
        log.info("programs compiled and loaded in %.2fs", time.perf_counter() - started)
        for line in self.datapath.attach(self.cgroup):
            log.info("%s (cgroup %s)", line, self.cgroup)
        self.maps = MapSet(self.settings.pin_dir)
        self.applier = apply.Applier(self.maps, self.settings.hash_seed)
        log.info("adopted %d services and %d backends from %s", len(self.applier.view.services),
                 len(self.applier.view.backends), self.settings.pin_dir)
        self._apply(desired)
        if self.ready_file:
            self.ready_file.write_text("ready\n")

    def _apply(self, desired: config.DesiredState) -> None:
        assert self.applier is not None
        self._mtime = self.config_path.stat().st_mtime
        result = self.applier.apply(desired)
        changes = ", ".join(f"{k}={v}" for k, v in sorted(result.summary.items())) or "no change"
        log.info("applied %s: %s (maglev %.3fs, write %.3fs)", self.config_path, changes,
                 result.build_seconds, result.write_seconds)

    def reload(self) -> bool:
        """Apply the file again; invalid content is rejected whole and the maps keep
        their state. Returns whether it applied."""
        try:
            desired = config.load_file(self.config_path)
        except (config.ConfigError, OSError) as exc:
            self._mtime = self._current_mtime()
            log.error("not applied, keeping the current state: %s", exc)
            return False
        self._apply(desired)
        return True

    def _current_mtime(self) -> float | None:
        try:
            return self.config_path.stat().st_mtime
        except OSError:
            return None

    def run(self, poll_interval: float = 1.0) -> None:
        while not self.stop_event.is_set():
            self.stop_event.wait(poll_interval)
            if self.reload_event.is_set() or self._current_mtime() != self._mtime:
                self.reload_event.clear()
                self.reload()

    def close(self, detach: bool) -> None:
        if self.applier:
            self.applier.close()
        if self.maps:
            self.maps.close()
        if self.datapath:
            self.datapath.close()
        if detach:
            for line in loader.uninstall(self.settings.pin_dir):
                log.info("removed %s", line)
            log.info("detached: kvroute no longer routes on this node")
        else:
            log.info("exiting; programs stay attached and keep routing from the pinned maps")

    def install_signals(self) -> None:
        def on_stop(signum: int, frame: FrameType | None) -> None:
            self.stop_event.set()

        def on_hup(signum: int, frame: FrameType | None) -> None:
            self.reload_event.set()

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGHUP, on_hup)
