"""Keeps the parts `devmeter up` runs alive: a part that dies is started again, and says so.

A part is anything with ``alive()`` and ``stop()``, started by a function that returns it (the
embedded broker, on the same port and with the same persistence; the ingest worker process).
Nothing here knows what a part is: ``devmeter/service.py`` decides what to supervise.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

log = logging.getLogger("devmeter.up")

#: How often parts are checked: a dead broker is noticed (and restarted) within this.
CHECK_INTERVAL_S = 0.5
#: A part that will not start is tried again after 1, 2, 4 ... seconds, at most this.
MAX_BACKOFF_S = 30.0


class Part(Protocol):
    def alive(self) -> bool: ...

    def stop(self) -> None: ...


P = TypeVar("P", bound=Part)


@dataclass
class _Slot:
    name: str
    start: Callable[[], Part]
    part: Part | None
    restarts: int = 0
    failures: int = 0
    next_try: float = 0.0


class Supervisor:
    def __init__(self, *, interval: float = CHECK_INTERVAL_S) -> None:
        self._interval = interval
        self._slots: list[_Slot] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="supervisor", daemon=True)

    def add(self, name: str, start: Callable[[], P]) -> P:
        """Start a part now (failing loudly if it cannot) and watch it from then on."""
        part = start()
        with self._lock:
            self._slots.append(_Slot(name, start, part))
        return part

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """No more restarts; then stop the parts, last added first (the worker before the
        broker, so it can acknowledge what it committed)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        with self._lock:
            slots = list(reversed(self._slots))
        for slot in slots:
            if slot.part is not None:
                try:
                    slot.part.stop()
                except Exception:
                    log.exception("%s did not stop cleanly", slot.name)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            with self._lock:
                slots = list(self._slots)
            for slot in slots:
                if self._stop.is_set():
                    return
                self._check(slot)

    def _check(self, slot: _Slot) -> None:
        if slot.part is not None and slot.part.alive():
            return
        now = time.monotonic()
        if now < slot.next_try:
            return
        if slot.part is not None:
            log.warning("%s died; restarting it", slot.name)
            try:
                slot.part.stop()  # releases what is left of it (pipes, atexit hooks)
            except Exception:
                log.exception("%s: cleaning up after it died failed", slot.name)
            slot.part = None
        try:
            slot.part = slot.start()
        except Exception as exc:
            slot.failures += 1
            delay = min(MAX_BACKOFF_S, 2.0 ** (slot.failures - 1))
            slot.next_try = now + delay
            log.error("%s could not be restarted (%s); next try in %.0f s", slot.name, exc, delay)
            return
        slot.failures = 0
        slot.restarts += 1
        log.warning("%s restarted (restart %d)", slot.name, slot.restarts)
