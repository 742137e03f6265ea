"""The claim protocol: how a worker takes a trial slot, and how a dead worker's trial is retried.

Everything here runs under the study-wide budget lock (:func:`~stagetune.optim.budget.budget_lock`),
on the connection that holds it:

* **the heartbeat rule**: one per study, stored in it (:data:`HEARTBEAT_ATTR`) by the
  first worker given ``--heartbeat-interval``/``--grace-period`` (the default rule,
  30 s and twice that, if trials were running already: their workers beat by it);
  until then every worker uses the default. Every worker judges staleness by the
  study's rule; one given other values follows it and says so in one warning line
  (refusing it would stop a Slurm array started with an old command line).
* **the stale check**: a RUNNING trial is stale when its last heartbeat is older than
  the grace period *and* this worker has seen that same heartbeat for a grace period
  already, both by the database server's clock (:func:`~stagetune.optim.budget.running_heartbeats`).
  The second condition makes an outage harmless: when the database comes back,
  every heartbeat is old, but a live worker beats again within its interval, and
  only a trial whose worker is really gone keeps its old beat.
* **orphans**: a RUNNING trial without any heartbeat was cut off while being
  claimed (every finished claim records the first beat under the lock); nothing
  ran it, so the next claim takes it on as its own (no FAIL row, no retry used).
* **the slot count**: RUNNING + WAITING + COMPLETE + PRUNED trials against the budget.
* **the first heartbeat**, recorded before the lock is let go.
* **a claim cut off after its first heartbeat** (a hung server: the client gave up
  waiting for the heartbeat's commit, which the server ran when it resumed): the
  trial is running with a beat, so it is no orphan; the worker's next claim takes
  it on (:meth:`Claims.claim`) instead of leaving it to be failed as stale. A trial
  taken on as an orphan is marked (:data:`ADOPTED_ATTR`), so the worker whose claim
  made it does not take it on too.
* **the lock's connection lost mid-claim** (a read timeout): nothing more runs on
  another connection, which would not hold the lock (``budget_lock(pinned=True)``);
  the claim fails and is retried from the start.

A trial taken away (failed as stale) or given up (SIGTERM, an infrastructure
failure) is failed and re-queued with its parameters (:meth:`Claims.requeue`),
so its retry resumes from its checkpoint.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Callable, Iterator

import optuna
from optuna.trial import TrialState
from sqlalchemy import Connection

from stagetune.errors import UsageError
from stagetune.optim.budget import (
    SLOT_STATES,
    budget_lock,
    count_by_state,
    orphaned_trials,
    running_heartbeats,
)
from stagetune.optim.optuna_internals import DbState, ask_new_trial, study_id_of, trial_id_of
from stagetune.optim.rdb import STALE_ATTR, StagetuneStorage
from stagetune.optim.spec import StudySpec

__all__ = ["HEARTBEAT_ATTR", "ADOPTED_ATTR", "DEFAULT_HEARTBEAT_INTERVAL", "HeartbeatRule", "Claims", "store_rule"]

#: Study system attribute holding the study's heartbeat rule ``{"interval": s, "grace_period": s}``.
HEARTBEAT_ATTR = "stagetune_heartbeat"
#: Seconds between heartbeats when neither the study nor the worker says.
DEFAULT_HEARTBEAT_INTERVAL = 30
#: Trial system attribute set on a trial taken on as an orphan; its value is the trial's id
#: (a retry copies its original's system attributes).
ADOPTED_ATTR = "stagetune_adopted_trial_id"


@dataclass(frozen=True)
class HeartbeatRule:
    """How often running trials beat, and after how long without a beat one is stale."""

    interval: int
    grace_period: int

    @classmethod
    def of(cls, interval: int | None, grace_period: int | None) -> HeartbeatRule:
        """The rule of these options (None: the defaults, 30 s and twice the interval)."""
        interval = DEFAULT_HEARTBEAT_INTERVAL if interval is None else interval
        for name, value in (("heartbeat interval", interval), ("grace period", grace_period)):
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise UsageError(f"{name} must be a positive whole number of seconds, got {value!r}")
        return cls(interval, 2 * interval if grace_period is None else grace_period)

    @classmethod
    def from_json(cls, data: Any) -> HeartbeatRule | None:
        try:
            return cls.of(int(data["interval"]), int(data["grace_period"]))
        except (TypeError, KeyError, ValueError, UsageError):
            return None

    def to_json(self) -> dict[str, int]:
        return {"interval": self.interval, "grace_period": self.grace_period}

    def describe(self) -> str:
        return f"a heartbeat every {self.interval} s, stale after {self.grace_period} s without one"


def store_rule(storage: StagetuneStorage, study_id: int, rule: HeartbeatRule) -> None:
    """Make ``rule`` the study's heartbeat rule (``optim init``; call under the budget lock)."""
    storage.set_study_system_attr(study_id, HEARTBEAT_ATTR, rule.to_json())


def _stored_rule(storage: StagetuneStorage, study_id: int) -> HeartbeatRule | None:
    return HeartbeatRule.from_json(storage.get_study_system_attrs(study_id).get(HEARTBEAT_ATTR))


class _StaleWatch:
    """Which RUNNING trials are stale, by heartbeats this worker has watched not move."""

    def __init__(self, grace: timedelta) -> None:
        self._grace = grace
        #: trial id -> (its old heartbeat, when this worker first saw it that old)
        self._seen: dict[int, tuple[datetime, datetime]] = {}

    def stale(self, now: datetime, beats: dict[int, tuple[int, datetime]]) -> list[int]:
        found = []
        for trial_id, (_number, beat) in beats.items():
            if now - beat <= self._grace:
                self._seen.pop(trial_id, None)
                continue
            seen = self._seen.get(trial_id)
            if seen is None or seen[0] != beat:
                self._seen[trial_id] = (beat, now)
            elif now - seen[1] >= self._grace:
                found.append(trial_id)
        for trial_id in set(self._seen) - set(beats):
            del self._seen[trial_id]
        return found

    def suspects(self, now: datetime, beats: dict[int, tuple[int, datetime]]) -> bool:
        """Whether some trial has missed its heartbeats (it may turn stale soon)."""
        return any(now - beat > self._grace for _number, beat in beats.values())


class Claims:
    """One worker's side of the claim protocol on one study.

    Args:
        storage: The worker's storage.
        study: The study, loaded through ``storage``.
        spec: Its spec (for the budget).
        rule: The heartbeat rule this worker was given (None: it was given none).
        max_retries: Retries of one trial (see ``RetryHeartbeatStaleTrialCallback``).
        log: Where the protocol's lines go.
    """

    def __init__(
        self,
        storage: StagetuneStorage,
        study: optuna.Study,
        spec: StudySpec,
        rule: HeartbeatRule | None,
        max_retries: int,
        log: Callable[[str], None],
    ) -> None:
        self.storage, self.study, self.spec, self.log = storage, study, spec, log
        self.study_id = study_id_of(study)
        self.given = rule
        self.rule = rule or HeartbeatRule.of(None, None)
        self._retry = optuna.storages.RetryHeartbeatStaleTrialCallback(
            max_retry=max_retries, inherit_intermediate_values=True
        )
        self._watch = _StaleWatch(timedelta(seconds=self.rule.grace_period))
        self._stored = False
        self._next_stale_check = 0.0
        self._suspects = False
        #: (number, id) of the trial of a claim cut off while recording its first heartbeat.
        self._pending: tuple[int, int] | None = None

    def join(self) -> str | None:
        """Adopt the study's heartbeat rule, storing one when this worker was given one.

        With no rule stored, a worker given none uses the default (and looks again at
        each claim); a worker given one stores it, unless trials are running already
        (their workers beat by the default rule, which it stores and follows instead).

        Returns:
            A warning when this worker was given another rule than the one it follows.
        """
        with self._locked() as conn:
            stored = _stored_rule(self.storage, self.study_id)
            if stored is None and self.given is not None:
                running = count_by_state(self.storage, self.study_id, conn).get(DbState.RUNNING, 0)
                stored = HeartbeatRule.of(None, None) if running else self.given
                store_rule(self.storage, self.study_id, stored)
        if stored is not None:
            self._adopt(stored)
        if self.given is not None and self.given != self.rule:
            return (
                f"study {self.study.study_name!r} judges heartbeats by its own rule ({self.rule.describe()}); "
                f"this worker follows it, not its --heartbeat-interval {self.given.interval} "
                f"--grace-period {self.given.grace_period}"
            )
        return None

    def _adopt(self, rule: HeartbeatRule) -> None:
        self.rule, self._stored = rule, True
        self._watch = _StaleWatch(timedelta(seconds=rule.grace_period))
        # The sweep that optuna's own code runs (study.optimize) uses the same rule.
        self.storage.heartbeat_interval = rule.interval
        self.storage.grace_period = rule.grace_period

    @contextmanager
    def _locked(self) -> Iterator[Connection | None]:
        with budget_lock(self.storage, self.study.study_name, pinned=True) as conn, self.storage.sessions_on(conn):
            yield conn

    def claim(self) -> optuna.Trial | None:
        """A new trial (its first heartbeat recorded), or None when the budget has no free slot.

        Safe to repeat after a failure: everything runs under the lock, and a claim
        cut off before its first heartbeat leaves an orphan the next claim takes on.
        """
        with self._locked() as conn:
            if not self._stored:  # a worker given no rule follows one stored since it joined
                stored = _stored_rule(self.storage, self.study_id)
                if stored is not None:
                    self._adopt(stored)
            if self._pending is not None:  # before the stale check: its beat may be old by now
                trial = self._take_on_pending(conn)
                if trial is not None:
                    return trial
            checked = time.monotonic() >= self._next_stale_check
            if checked:
                self._fail_stale(conn)
            orphans = orphaned_trials(self.storage, self.study_id, conn)
            if orphans:
                # Cut off between creating the trial and its first heartbeat (this worker's
                # claim, retried now, or a dead one's): nothing ran, so it is simply taken on.
                number, trial_id = min(orphans.items())
                if self._pending is None or self._pending[1] != trial_id:  # not this worker's own
                    self.storage.set_trial_system_attr(trial_id, ADOPTED_ATTR, trial_id)
                trial = self._start(number, trial_id)
                self.log(f"trial {number} was claimed but never started (its claim was cut off); taking it on")
                return trial
            counts = count_by_state(self.storage, self.study_id, conn)
            if self.spec.num_trials is not None:
                if self._full(counts) and not checked:  # a stale trial may hold the slot
                    self._fail_stale(conn)
                    counts = count_by_state(self.storage, self.study_id, conn)
                if self._full(counts):
                    return None
            # Trials are queued under this lock: with none waiting, a new trial is created
            # without optuna's look for one (which reads every trial of the study once).
            trial = self.study.ask() if counts.get(DbState.WAITING, 0) else ask_new_trial(self.study)
            self._pending = (trial.number, trial_id_of(trial))
            self.storage.record_heartbeat(trial_id_of(trial))
            self._pending = None
            return trial

    def _start(self, number: int, trial_id: int) -> optuna.Trial:
        """This worker's trial ``trial_id``, its heartbeat recorded (under the lock)."""
        # Read through the study, so its storage's cache learns the trial (as ask does).
        self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        trial = optuna.Trial(self.study, trial_id)
        self._pending = (number, trial_id)
        self.storage.record_heartbeat(trial_id)  # last: cut off before, it stays an orphan
        self._pending = None
        return trial

    def _take_on_pending(self, conn: Any) -> optuna.Trial | None:
        """The trial of this worker's claim cut off at its first heartbeat, if the beat was recorded.

        None when it has no beat (an orphan: taken on as one), was taken on by another
        worker (marked :data:`ADOPTED_ATTR`), or is no longer running.
        """
        number, trial_id = self._pending
        _now, beats = running_heartbeats(self.storage, self.study_id, conn)
        if trial_id not in beats:
            if trial_id not in orphaned_trials(self.storage, self.study_id, conn):
                self._pending = None  # finished or failed meanwhile: nothing to take on
            return None
        if self.storage.get_trial(trial_id).system_attrs.get(ADOPTED_ATTR) == trial_id:
            self._pending = None  # another worker took it on as an orphan, and runs it
            return None
        trial = self._start(number, trial_id)
        self.log(f"trial {number} was claimed but its claim was cut off after its first heartbeat; taking it on")
        return trial

    def _full(self, counts: dict[str, int]) -> bool:
        slots = sum(counts.get(s, 0) for s in SLOT_STATES)
        return slots >= self.spec.num_trials and counts.get(DbState.WAITING, 0) == 0

    def _fail_stale(self, conn: Any) -> None:
        # Once per heartbeat interval (or grace period, if shorter) finds them about as
        # early as every claim would.
        self._next_stale_check = time.monotonic() + min(self.rule.interval, self.rule.grace_period)
        now, beats = running_heartbeats(self.storage, self.study_id, conn)
        self._suspects = self._watch.suspects(now, beats)
        for trial_id in self._watch.stale(now, beats):
            number = beats[trial_id][0]
            try:  # marked first: status tells a dead worker's trial from a handed-back one
                self.storage.set_trial_system_attr(trial_id, STALE_ATTR, trial_id)
            except optuna.exceptions.UpdateFinishedTrialError:
                continue  # its worker reported it meanwhile: it was alive after all
            if not self.requeue(trial_id):
                continue
            self.log(
                f"trial {number} is stale (no heartbeat for over {self.rule.grace_period} s: its worker "
                f"is gone); re-queued for retry"
            )

    def suspects(self) -> bool:
        """Whether the last stale check saw a trial that missed its heartbeats (worth waiting for)."""
        return self._suspects

    def requeue(self, trial_id: int) -> bool:
        """Fail a trial and queue a retry with its parameters (call under the lock).

        FAIL first: cut off in between, the retry is lost but the slot is freed; the
        other order could leave the trial running beside its retry, counted twice.
        A trial that has used up its retries stays FAIL.

        Returns:
            False when the trial had finished already (nothing was changed).
        """
        try:
            self.storage.set_trial_state_values(trial_id, state=TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            return False
        self._retry(self.study, self.storage.get_trial(trial_id))
        return True

    def give_back(self, trial_id: int) -> bool:
        """Fail and re-queue one of this worker's trials (SIGTERM, an infrastructure failure).

        Returns:
            False when the trial was no longer running (another worker took it over).
        """
        with self._locked():
            return self.requeue(trial_id)
