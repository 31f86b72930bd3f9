"""Loads, reloads and unloads models while the server keeps serving.

A reload builds the new version beside the old one, swaps the model's version
map in one assignment (the event loop makes that atomic for requests), and
retires the old version only after the requests that hold it have finished.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from calib.cache import sha256_file
from daemon.config import CONFIG_FILENAME, ModelConfig, load_model_config
from daemon.engines.factory import EngineFactory, Prepared, calibration_path
from daemon.errors import ConfigError, FailedPrecondition, InvalidArgument, NoSpace, NotFound, TegradError
from daemon.monitor.engine import attach as attach_monitor
from daemon.pipeline.processed import ProcessedEngine
from daemon.pipeline.scheduler import Scheduler, SchedulerOptions
from daemon.repository import layout
from daemon.repository.state import ACTIVATING, ACTIVE, FAILED, INACTIVE, STAGED, StateStore, event
from daemon.telemetry import metrics
from daemon.telemetry.stats import VersionStats
from daemon.tensor_spec import TensorSpec

log = logging.getLogger("tegrad.repository")


@dataclass(eq=False)
class LoadedVersion:
    name: str
    version: int
    config: ModelConfig
    engine: object
    scheduler: Scheduler
    stats: VersionStats
    fingerprint: str
    prepared: Prepared
    users: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def inputs(self) -> list[TensorSpec]:
        return self.engine.inputs

    @property
    def outputs(self) -> list[TensorSpec]:
        return self.engine.outputs

    @property
    def batched(self) -> bool:
        return self.config.max_batch > 0

    def acquire(self) -> None:
        self.users += 1
        self.idle.clear()

    def release(self) -> None:
        self.users -= 1
        if self.users == 0:
            self.idle.set()

    async def retire(self, timeout: float) -> None:
        if self.users:
            try:
                await asyncio.wait_for(self.idle.wait(), timeout)
            except asyncio.TimeoutError:
                log.warning("model %s version %d: %d requests still running after %.0f s; closing anyway",
                            self.name, self.version, self.users, timeout)
        await self.scheduler.drain(timeout)
        self.engine.close()


@dataclass
class ModelEntry:
    name: str
    serving: dict[int, LoadedVersion] = field(default_factory=dict)
    states: dict[int, tuple[str, str]] = field(default_factory=dict)
    error: str = ""  # why the last load failed before reaching any version (the index shows it)


def _fingerprint(config_dir: Path, model_file: Path, config: ModelConfig) -> tuple[str, str]:
    """(what a reload compares: config, model and calibration cache; the model's own sha256).

    The model's hash is returned too, so that the engine factory does not read the file again.
    """
    digest = hashlib.sha256()
    config_path = config_dir / CONFIG_FILENAME
    digest.update(config_path.read_bytes() if config_path.exists() else b"")
    model_sha = sha256_file(model_file)
    digest.update(model_sha.encode())
    try:
        calib = calibration_path(config, config_dir)
    except ConfigError:  # a missing cache is reported by the build, with the version's state
        calib = None
    if calib is not None:
        digest.update(sha256_file(calib).encode())
    return digest.hexdigest(), model_sha


class ModelManager:
    def __init__(self, root: Path, store: StateStore, factory: EngineFactory, *, control_mode: str = "none",
                 drain_timeout: float = 30.0) -> None:
        if control_mode not in ("none", "explicit"):
            raise ValueError(f"unknown model control mode {control_mode!r}")
        self.root = root
        self.store = store
        self.factory = factory
        self.control_mode = control_mode
        self.drain_timeout = drain_timeout
        self._models: dict[str, ModelEntry] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._retiring: set[asyncio.Task] = set()
        self._wanted: set[str] = set()  # models that should be serving (loaded, not unloaded)
        self._activations: dict[str, asyncio.Lock] = {}
        # Image decoding for every model's requests, ahead of the slots (OpenCV releases the GIL).
        self._decode_pool = ThreadPoolExecutor(max(2, os.cpu_count() or 1), thread_name_prefix="tegrad-decode")
        # What a live precision breach ([monitor] rollback_below) runs: the admin API's rollback
        # path when the daemon has one (set by the server), else the manager's own.
        self.precision_rollback: Callable[[str], Awaitable] = self.rollback
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- startup and shutdown ---------------------------------------------------------------

    async def startup(self, load: list[str]) -> None:
        if self.control_mode == "none" or "*" in load:
            try:
                names = layout.model_names(self.root)
            except TegradError as exc:  # the daemon still comes up: its index and loads say what is wrong
                log.error("cannot list the models at startup: %s", exc)
                names = []
        else:
            names = sorted(set(load) | set(self.store.loaded_models()))
        for name in names:
            try:
                if not self.store.rollout_model(name)[0] and self.store.rollout_versions(name) \
                        and not os.path.exists(self.root / name / CONFIG_FILENAME):
                    log.info("model %s: only staged versions, none activated yet; not serving it", name)
                    continue
                await self.load(name)
            except TegradError as exc:
                log.error("model %s failed to load at startup: %s", name, exc)

    async def shutdown(self) -> None:
        versions = [lv for e in self._models.values() for lv in e.serving.values()]
        for entry in self._models.values():
            entry.serving = {}
        await asyncio.gather(*(lv.retire(self.drain_timeout) for lv in versions), *self._retiring)
        self._decode_pool.shutdown(wait=False)

    # -- state ---------------------------------------------------------------------------------

    def _set_state(self, name: str, version: int, state: str, reason: str = "", engine_id: str = "", *,
                   must_persist: bool = True) -> None:
        """Record a version's state, in SQLite first: a state that cannot be recorded (disk full)
        raises (NoSpace) before anything claims it. ``must_persist=False``: for the states a failure
        or an unload ends in, which are kept in memory whatever the disk says."""
        try:
            self.store.set_version_state(name, version, state, reason, engine_id)
        except TegradError as exc:  # NoSpace, a read-only state database
            if must_persist:
                raise
            log.warning("model %s version %d: %s not recorded: %s", name, version, state, exc)
        entry = self._models.setdefault(name, ModelEntry(name))
        entry.states[version] = (state, reason)
        metrics.set_model_state(name, str(version), state)
        log.info("model %s version %d: %s%s", name, version, state, f" ({reason})" if reason else "")

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    def check_control(self) -> None:
        if self.control_mode != "explicit":
            raise FailedPrecondition(
                "model control mode is 'none': models are loaded at startup only; "
                "start tegrad with --model-control explicit to load and unload models at run time"
            )

    # -- load / unload --------------------------------------------------------------------------

    def _report(self, name: str, version: int, serving: bool) -> Callable[[str], None]:
        def report(progress: str) -> None:
            if serving:  # a reload: the loaded one stays READY while its replacement builds
                log.info("model %s version %d: reload %s", name, version, progress)
            else:
                self._set_state(name, version, "LOADING", progress)

        return report

    def _select(self, name: str, mdir: Path, config: ModelConfig) -> list[int]:
        """Versions to serve: the rollout's active one, else the version policy's choice among the
        versions on disk that no rollout holds back (staged, failed or retired ones)."""
        active, _ = self.store.rollout_model(name)
        if active:
            return [active]
        held = {v.version for v in self.store.rollout_versions(name) if v.state != ACTIVE}
        available = [v for v in layout.versions_on_disk(mdir, layout.model_filenames(config)) if v not in held]
        return config.version_policy.select(available)

    async def load(self, name: str, *, pin: int | None = None) -> None:
        """Load or reload ``name``: new versions come up beside the old, then switch atomically.

        ``pin``: serve exactly this version (an activation), whatever the policy says.
        """
        async with self._lock(name):
            mdir = layout.model_dir(self.root, name)
            self._wanted.add(name)
            entry = self._models.setdefault(name, ModelEntry(name))
            try:
                model_config = await asyncio.to_thread(self._config, mdir, name)
                wanted = [pin] if pin else self._select(name, mdir, model_config)
                available = [] if wanted else await asyncio.to_thread(
                    layout.versions_on_disk, mdir, layout.model_filenames(model_config))
            except (OSError, TegradError) as exc:
                err = layout.file_error(self.root, exc) if isinstance(exc, OSError) else exc
                entry.error = layout.scrub(self.root, str(err))
                raise err from None
            entry.error = ""
            if not wanted:
                entry.error = (
                    f"model {name}: no version directory under {name}/ holds "
                    f"{' or '.join(layout.model_filenames(model_config))} "
                    f"and matches the version policy (found versions {available or 'none'}"
                    f"{'; staged versions wait for activation' if self.store.rollout_versions(name) else ''})"
                )
                raise InvalidArgument(entry.error)
            serving: dict[int, LoadedVersion] = {}
            built: list[LoadedVersion] = []
            failures: list[tuple[TegradError, str]] = []

            def failed(version: int, exc: TegradError | OSError) -> None:
                err = layout.file_error(self.root, exc) if isinstance(exc, OSError) else exc
                reason = layout.scrub(self.root, str(err))
                failures.append((err, f"version {version}: {reason}"))
                if version in entry.serving:
                    serving[version] = entry.serving[version]  # keep serving what worked
                    log.error("model %s version %d: reload failed, keeping the loaded one: %s", name, version, err)
                else:
                    self._set_state(name, version, "UNAVAILABLE", reason, must_persist=False)

            for version in wanted:
                cdir = layout.config_dir(mdir, version)
                try:
                    config = model_config if cdir == mdir else await asyncio.to_thread(self._config, cdir, name)
                    model_file = layout.model_file(mdir / str(version), config)
                    if not model_file.is_file():
                        raise NotFound(f"model {name} has no version {version} "
                                       f"({layout.relative(self.root, model_file)} does not exist)")
                    fingerprint, model_sha = await asyncio.to_thread(_fingerprint, cdir, model_file, config)
                except (TegradError, OSError) as exc:
                    failed(version, exc)
                    continue
                old = entry.serving.get(version)
                if old is not None and old.fingerprint == fingerprint:
                    serving[version] = old
                    continue
                try:
                    if old is None:
                        self._set_state(name, version, "LOADING")
                    prepared = await self.factory.prepare(config, cdir, version, model_file,
                                                          self._report(name, version, old is not None), model_sha)
                except (TegradError, OSError) as exc:
                    failed(version, exc)
                    continue
                stats = VersionStats(name, str(version))
                options = SchedulerOptions(
                    max_batch=config.max_batch,
                    instances=config.instances,
                    max_queue_delay_us=config.dynamic_batching.max_queue_delay_us,
                    preferred_batch_sizes=tuple(config.dynamic_batching.preferred_batch_sizes),
                    max_queue_size=config.dynamic_batching.max_queue_size,
                    inline_below_us=config.inline_below_us,
                )
                engine = self._monitored(prepared.engine, config, name, version, model_file, cdir)
                if config.preprocess or config.postprocess:
                    try:
                        engine = ProcessedEngine(engine, config, cdir, self._decode_pool)
                    except TegradError as exc:
                        engine.close()
                        failed(version, exc)
                        continue
                scheduler = Scheduler(engine, options, stats, f"{name}/{version}")
                lv = LoadedVersion(name, version, config, engine, scheduler, stats, fingerprint, prepared)
                lv.idle.set()
                serving[version] = lv
                built.append(lv)
            try:
                # Recorded before the switch: a version serves only once a restart would know of it.
                for lv in built:
                    self._set_state(name, lv.version, "READY", "", lv.engine.engine_id)
                if serving:
                    self.store.set_loaded(name, True)
            except TegradError as exc:  # the state cannot be recorded
                for lv in built:
                    del serving[lv.version]
                    await lv.retire(self.drain_timeout)  # never served: nothing to wait for
                    failed(lv.version, exc)
                if not built:
                    failures.append((exc, str(exc)))
                built = []
            retired = [lv for v, lv in entry.serving.items() if serving.get(v) is not lv]
            if failures:
                # A version that failed to build never costs the ones serving now.
                for lv in retired:
                    serving.setdefault(lv.version, lv)
                retired = [lv for lv in retired if serving[lv.version] is not lv]
            entry.serving = serving  # the atomic switch
            for lv in built:
                metrics.set_model_info(name, str(lv.version), lv.engine.backend, lv.engine.precision, lv.engine.engine_id,
                                       lv.prepared.calibration_cache_id, lv.prepared.layers)
            for lv in retired:
                self._start_retire(lv, gone=lv.version not in serving)
            if built:
                # Versions kept for rollback keep their engines: a rollback must not rebuild.
                keep = {lv.prepared.key for lv in self.loaded()}
                keep |= {v.engine_key for v in self.store.rollout_versions() if v.engine_key and v.state != FAILED}
                await asyncio.to_thread(self.factory.cache.evict, keep)
            if failures:
                # The status says what would fix it: free disk space, file permissions, or the files.
                kinds = [e for e, _ in failures]
                cls = NoSpace if any(isinstance(e, NoSpace) for e in kinds) else \
                    FailedPrecondition if any(isinstance(e, FailedPrecondition) for e in kinds) else InvalidArgument
                raise cls(f"model {name} failed to load: " + "; ".join(m for _, m in failures))

    def _config(self, config_dir: Path, name: str) -> ModelConfig:
        return load_model_config(config_dir, name,
                                 shown_as=layout.relative(self.root, config_dir / CONFIG_FILENAME))

    def _monitored(self, engine, config: ModelConfig, name: str, version: int, model_file: Path, cdir: Path):
        """The engine with a precision monitor when its config asks for one; a monitor that cannot
        start is logged and left out, never a reason to refuse the version."""
        self._loop = asyncio.get_running_loop()
        try:
            return attach_monitor(engine, config, model=name, version=version, model_file=model_file,
                                  config_dir=cdir, on_breach=self._breach)
        except Exception as exc:
            log.error("model %s version %d: precision monitor not started: %s", name, version, exc)
            return engine

    def _breach(self, name: str, version: int, reason: str) -> None:
        """From a monitor's worker thread: hand the breach to the event loop."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._precision_breach(name, version, reason)))

    async def _precision_breach(self, name: str, version: int, reason: str) -> None:
        active, previous = self.store.rollout_model(name)
        if active != version or not previous:
            why = "it was not activated by a rollout" if active != version else "there is no previous version"
            log.warning("model %s version %d: live precision breach (%s); not rolled back: %s", name, version, reason, why)
            event("precision_breach", model=name, version=version, reason=reason, rolled_back=False)
            return
        event("precision_rollback", model=name, version=version, to=previous, reason=reason)
        metrics.PRECISION_ROLLBACKS.labels(name).inc()
        try:
            await self.precision_rollback(name)
        except TegradError as exc:
            log.error("model %s: precision rollback from version %d failed: %s", name, version, exc)

    def _start_retire(self, lv: LoadedVersion, *, gone: bool) -> asyncio.Task:
        async def run() -> None:
            if gone:
                self._set_state(lv.name, lv.version, "UNLOADING", must_persist=False)
            await lv.retire(self.drain_timeout)
            if gone:
                self._set_state(lv.name, lv.version, "UNAVAILABLE", "unloaded", must_persist=False)
                metrics.forget_model_version(lv.name, str(lv.version))

        task = asyncio.ensure_future(run())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
        return task

    async def unload(self, name: str) -> None:
        if self.factory.pool.cancel(name):  # a build in progress holds the lock; stop it first
            log.info("model %s: unload cancelled its engine build", name)
        async with self._lock(name):
            entry = self._models.get(name)
            if entry is None or not entry.serving:
                layout.model_dir(self.root, name)  # NOT_FOUND for names not in the repository
                self._wanted.discard(name)
                self.store.set_loaded(name, False)
                return
            self._wanted.discard(name)
            retired = list(entry.serving.values())
            entry.serving = {}
            self.store.set_loaded(name, False)
            await asyncio.gather(*(self._start_retire(lv, gone=True) for lv in retired))

    # -- activation (rollouts) --------------------------------------------------------------------

    async def activate(self, name: str, version: int, *, loaded: Callable[[], None] = lambda: None) -> LoadedVersion:
        """Serve ``version`` of ``name`` for requests that name no version; the old version drains.

        Two-phase: the version is recorded ACTIVATING, loaded beside the current one (from its cached
        engine), switched to, and only then committed ACTIVE together with the model's
        active/previous pointers. A crash before the commit leaves the previous active version in
        charge after a restart (:meth:`StateStore.recover`). ``loaded`` runs between the switch and
        the commit (a test hook point).
        """
        lock = self._activations.setdefault(name, asyncio.Lock())
        async with lock:
            mdir = layout.model_dir(self.root, name)
            record = self.store.rollout_version(name, version)
            if record is None:
                if not (mdir / str(version)).is_dir():
                    raise NotFound(f"model {name} has no version {version}")
            elif record.state not in (STAGED, INACTIVE, ACTIVE):
                why = f" ({record.reason})" if record.reason else ""
                raise FailedPrecondition(f"model {name} version {version} is {record.state}{why}; "
                                         "only staged (validated) or earlier active versions can be activated")
            active, previous = self.store.rollout_model(name)
            entry = self._models.get(name)
            if not active and entry is not None and entry.serving:
                # The first activation through a rollout: what the version policy serves now is
                # recorded as active, so that Rollback can return to it.
                active = max(entry.serving)
                if self.store.rollout_version(name, active) is None:
                    self._record(entry.serving[active], ACTIVE)
                self.store.commit_activation(name, active, previous)
            if active == version and entry is not None and version in entry.serving:
                return entry.serving[version]
            prior = record.state if record else INACTIVE
            self.store.set_rollout_state(name, version, ACTIVATING)
            try:
                await self.load(name, pin=version)
            except BaseException as exc:
                self.store.set_rollout_state(name, version, prior, f"activation failed: {exc}")
                raise
            lv = self._models[name].serving[version]
            self._record(lv, ACTIVATING)
            loaded()
            self.store.commit_activation(name, version, active if active != version else previous)
            metrics.set_active_version(name, version)
            return lv

    async def rollback(self, name: str, **kwargs) -> LoadedVersion:
        """Activate the version that was active before the current one."""
        layout.model_dir(self.root, name)
        active, previous = self.store.rollout_model(name)
        if not previous:
            raise FailedPrecondition(f"model {name} has no previous active version to roll back to"
                                     f"{f' (version {active} is the only one activated)' if active else ''}")
        return await self.activate(name, previous, **kwargs)

    def _record(self, lv: LoadedVersion, state: str) -> None:
        """Keep what the engine of a loaded version is (for ListModels and engine-cache retention)."""
        self.store.set_rollout_state(lv.name, lv.version, state, precision=lv.engine.precision,
                                     engine_key=lv.prepared.key, calibration_cache_id=lv.prepared.calibration_cache_id)

    def serving_state(self, name: str, version: int) -> tuple[str, str]:
        entry = self._models.get(name)
        return entry.states.get(version, ("", "")) if entry else ("", "")

    # -- lookups ----------------------------------------------------------------------------------

    def resolve(self, name: str, version: str = "") -> LoadedVersion:
        """The version that serves a request; raises NOT_FOUND or FAILED_PRECONDITION."""
        entry = self._models.get(name)
        if entry is None or (not entry.serving and not entry.states):
            layout.model_dir(self.root, name)
            raise FailedPrecondition(f"model {name!r} is not loaded; load it with RepositoryModelLoad")
        if version:
            if not version.isdigit():
                raise NotFound(f"model {name!r} has no version {version!r}: versions are positive integers")
            lv = entry.serving.get(int(version))
            if lv is not None:
                return lv
            state = entry.states.get(int(version))
            if state is None:
                raise NotFound(f"model {name!r} has no version {version}; loaded versions: {sorted(entry.serving) or 'none'}")
            raise FailedPrecondition(f"model {name!r} version {version} is not ready ({state[0]}{': ' + state[1] if state[1] else ''})")
        if not entry.serving:
            reasons = "; ".join(f"version {v}: {s}{' (' + r + ')' if r else ''}" for v, (s, r) in sorted(entry.states.items()))
            raise FailedPrecondition(f"model {name!r} has no ready version ({reasons or 'not loaded'})")
        return entry.serving[max(entry.serving)]

    def versions(self, name: str) -> list[int]:
        entry = self._models.get(name)
        return sorted(entry.serving) if entry else []

    def loaded(self) -> list[LoadedVersion]:
        return [lv for e in self._models.values() for lv in e.serving.values()]

    def index(self, ready_only: bool = False) -> list[tuple[str, str, str, str]]:
        rows = []
        names = set(self._models)
        try:
            names |= set(layout.model_names(self.root))
        except TegradError as exc:  # the models known in memory are still listed, with their states
            log.warning("repository index: %s", exc)
        for name in sorted(names):
            entry = self._models.get(name)
            if entry is None or not entry.states:
                if not ready_only:
                    rows.append((name, "", "UNAVAILABLE", (entry.error if entry else "") or "not loaded"))
                continue
            for version, (state, reason) in sorted(entry.states.items()):
                if ready_only and state != "READY":
                    continue
                rows.append((name, str(version), state, reason))
        return rows

    def all_ready(self) -> bool:
        """Every model this server means to serve has a ready version (Triton's strict readiness)."""
        return all(self._models[n].serving for n in self._wanted if n in self._models)
