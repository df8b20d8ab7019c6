"""``--executor ray``: the missing shards of a sharded stage, computed by Ray actors.

``seqpatch.executor.execute`` stays the one place that chains stages: it resolves parents,
computes the version and commits. For a stage with ``build_shard`` it hands the shards still
missing to ``RayExecutor.run``, which

1. connects to Ray (``ray.init(address=...)`` for a cluster started with ``ray start --head``;
   a local instance otherwise) — and shuts down only an instance it started itself;
2. starts one actor per device: per GPU when the cluster has GPUs, else per CPU slot. Each actor
   rebuilds the stage's ``Inputs`` from the parents' ``StageRef``s (paths on a filesystem every
   node shares at the same path), loads the model once, runs the stage's ``prepare``, then
   builds shard after shard, checking before each write that the models it loaded have the
   identities the version was computed from;
3. has each actor write its shards with ``Store.write_shard``, atomically and under the shard's
   lock, into ``<version>.partial/shard-0000i/`` — the folder ``Store.build_sharded`` uses — so
   a rerun (local or Ray) skips finished shards and the committed version is the one a local
   build gives, by construction;
4. retries a shard whose actor died (``max_restarts``/``max_task_retries``), and shows a bar
   over shards on the driver.

The driver then commits once through the ordinary ``build_sharded`` path (every shard present:
concatenate, artifacts, provenance, rename). Nothing here decides what a stage computes.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from seqpatch.errors import SeqpatchError

if TYPE_CHECKING:
    from seqpatch.stages.base import Built, Inputs
    from seqpatch.store import StageRef, Store

ShardFn = Callable[["Inputs", Any, int], "Built"]
"""``build_shard(inputs, cfg, index)``, a stage module's or a replacement (tests inject faults)."""

INSTALL_HINT = "pip install 'seqpatch[ray]'"


class RayExecutorError(SeqpatchError):
    """Ray is missing, unreachable, or its workers could not finish the stage's shards."""


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise RayExecutorError(
            f"--executor ray needs the ray package; install it with `{INSTALL_HINT}`"
        ) from None
    return ray


@dataclasses.dataclass
class RayExecutor:
    """Computes a sharded stage's missing shards on Ray; ``execute`` commits them (a
    ``seqpatch.shard_runner.ShardRunner``).

    ``address``: a running cluster (``ray://host:10001`` or ``host:6379``); ``None`` connects to
    the instance this process already started, else starts a local one. ``workers`` caps the
    actors (default: one per GPU, else one per CPU slot). ``max_retries``: restarts of a dead
    actor, and retries of the shard it was building. ``build_shard`` replaces the stage's own
    (tests use it to kill a worker mid-shard). After ``run``, ``computed`` lists the shards
    this run built, ``timings`` each shard's actor-side seconds (``setup``: model load and
    checks, on an actor's first shard; ``compute``: the stage's ``build_shard``; ``total``:
    with the write) and ``wall`` the seconds from starting the actors to the last shard.
    """

    address: str | None = None
    workers: int | None = None
    max_retries: int = 3
    build_shard: ShardFn | None = None
    computed: list[int] = dataclasses.field(default_factory=list)
    timings: dict[int, dict[str, float]] = dataclasses.field(default_factory=dict)
    wall: float = 0.0

    def run(
        self,
        store: Store,
        module: Any,
        cfg: Any,
        inputs: Inputs,
        n_shards: int,
        shards: Sequence[int] | None = None,
        progress: bool = True,
    ) -> list[int]:
        """Build the shards of ``shards`` (default all) not yet in the store; returns those built."""
        from seqpatch.progress import progress_bar

        self.computed, self.timings, self.wall = [], {}, 0.0
        wanted = set(range(n_shards) if shards is None else shards)
        stage, version = module.STAGE, inputs.version
        missing = [i for i in store.missing_shards(stage, version, n_shards) if i in wanted]
        if not missing:
            return []
        store.check_parents(inputs.parents.values())  # workers read them: never a damaged one
        ray = _ray()
        started = self._connect(ray)
        actors: list[Any] = []
        start = time.perf_counter()
        try:
            actors = self._start_actors(ray, store, module, cfg, inputs, len(missing))
            queue = deque(missing)
            pending: dict[Any, Any] = {}

            def submit(actor: Any) -> None:
                if queue:
                    pending[actor.build.remote(queue.popleft(), n_shards)] = actor

            for actor in actors:
                submit(actor)
            label = f"{stage} (shards on ray, {len(actors)} workers)"
            with progress_bar(len(missing), label, enabled=progress) as bar:
                while pending:
                    (done,), _ = ray.wait(list(pending), num_returns=1)
                    actor = pending.pop(done)
                    result = _result(ray, done)
                    index = result.pop("index")
                    if result.pop("built"):
                        self.computed.append(index)
                    self.timings[index] = result
                    bar.update()
                    submit(actor)
            self.wall = time.perf_counter() - start
        finally:
            for actor in actors:
                ray.kill(actor)
            if started:
                ray.shutdown()
        lost = [i for i in store.missing_shards(stage, version, n_shards) if i in wanted]
        if lost:
            raise RayExecutorError(
                f"Ray workers built shards {lost} of {stage}/{version}, but they are not in "
                f"{store.data_dir} here: the data dir must be one shared filesystem mounted at "
                "the same path on every node"
            )
        self.computed.sort()
        return self.computed

    def _connect(self, ray: Any) -> bool:
        """Connect (or start a local instance); ``True`` when this call started one."""
        if ray.is_initialized():
            return False
        try:
            if self.address is not None:
                ray.init(address=self.address, log_to_driver=False)
            else:
                ray.init(num_cpus=self.workers, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as err:
            where = f"the Ray cluster at {self.address}" if self.address else "a local Ray"
            raise RayExecutorError(
                f"cannot start or reach {where} ({err}); check `ray status` on the head node "
                "and pass its address with --ray-address"
            ) from err
        return True

    def _start_actors(
        self,
        ray: Any,
        store: Store,
        module: Any,
        cfg: Any,
        inputs: Inputs,
        n_missing: int,
    ) -> list[Any]:
        from seqpatch.shard_runner import model_identity

        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        slots = gpus or max(1, int(resources.get("CPU", 1)))
        count = min(slots, n_missing, self.workers or slots)
        options: dict[str, Any] = {
            "num_cpus": 1,
            "num_gpus": 1 if gpus else 0,
            "max_restarts": self.max_retries,
            "max_task_retries": self.max_retries,
        }
        worker = ray.remote(**options)(ShardWorker)
        spec = WorkerSpec(
            data_dir=str(store.data_dir.resolve()),
            stage=module.STAGE,
            cfg=cfg,
            parents={name: _absolute(ref) for name, ref in inputs.parents.items()},
            specs=inputs.specs,
            version=inputs.version,
            models={name: model_identity((name,), inputs.models) for name in inputs.specs},
            build_shard=self.build_shard,
            threads=None if gpus else 1,
            runtime=dataclasses.replace(inputs.runtime, executor="local", progress=False),
            shard_size=inputs.shard_size,
        )
        return [worker.remote(spec) for _ in range(count)]


def _absolute(ref: StageRef) -> StageRef:
    return dataclasses.replace(ref, path=ref.path.resolve())


def _result(ray: Any, ref: Any) -> dict[str, Any]:
    """A shard's result; a worker's ``SeqpatchError`` is re-raised as itself (one line)."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as err:
        if isinstance(err.cause, SeqpatchError):
            raise err.cause from None
        raise
    except ray.exceptions.RayActorError as err:
        raise RayExecutorError(
            f"a Ray worker died and its restarts are used up ({err.__class__.__name__}); "
            "rerun the same command: finished shards are kept"
        ) from err


@dataclasses.dataclass(frozen=True)
class WorkerSpec:
    """All an actor needs to rebuild the stage's inputs on any node (picklable)."""

    data_dir: str
    stage: str
    cfg: Any
    parents: dict[str, StageRef]
    specs: tuple[str, ...]
    version: str
    models: dict[str, dict[str, Any] | None]
    build_shard: ShardFn | None
    threads: int | None
    runtime: Any = None  # the driver's RuntimeSettings (engine path, device), run here locally
    shard_size: int = 0


class ShardWorker:
    """A Ray actor: one model copy (loaded on first use), building shards of one stage version."""

    def __init__(self, spec: WorkerSpec) -> None:
        from seqpatch.options import RuntimeSettings
        from seqpatch.stages import get_stage
        from seqpatch.stages.base import Inputs, ModelCache
        from seqpatch.store import Store
        from seqpatch.threads import THREADS_ENV

        if spec.threads is not None:
            os.environ.setdefault(THREADS_ENV, str(spec.threads))
        self.spec = spec
        self.module = get_stage(spec.stage)
        self.store = Store(spec.data_dir)
        runtime = spec.runtime if spec.runtime is not None else RuntimeSettings(progress=False)
        models = ModelCache(device=runtime.resolved_device())  # this node's device
        self.inputs = Inputs(
            dict(spec.parents), models, spec.specs, False, spec.version, runtime, spec.shard_size
        )
        self.ready = False

    def pid(self) -> int:
        return os.getpid()

    def build(self, index: int, n_shards: int) -> dict[str, Any]:
        """Build and write shard ``index`` unless finished: ``{index, built}`` and timings."""
        from seqpatch.progress import quiet_libraries
        from seqpatch.shard_runner import datasets_caching_off

        spec = self.spec
        build_shard = spec.build_shard or self.module.build_shard
        times = {"setup": 0.0, "compute": 0.0}

        def timed(i: int) -> Built:
            start = time.perf_counter()
            built = build_shard(self.inputs, spec.cfg, i)
            times["compute"] = time.perf_counter() - start
            self._check_models()
            return built

        with datasets_caching_off(), quiet_libraries():
            start = time.perf_counter()
            if not self.ready:
                self._setup()
                times["setup"] = time.perf_counter() - start
            start = time.perf_counter()
            built = self.store.write_shard(spec.stage, spec.version, n_shards, index, timed)
            times["total"] = time.perf_counter() - start
        return {"index": index, "built": built, **times}

    def _setup(self) -> None:
        """The stage's ``prepare`` (checks that must pass before anything is written)."""
        self.module.prepare(self.inputs, self.spec.cfg)
        self.ready = True

    def _check_models(self) -> None:
        """Every model this worker loaded is the one the version names (same id and revision),
        so a node with other model files never writes a shard into this version."""
        from seqpatch.shard_runner import model_identity
        from seqpatch.stages.base import StageError

        for spec, expected in self.spec.models.items():
            if spec not in self.inputs.models:
                continue
            found = model_identity((spec,), self.inputs.models)
            if found != expected:
                raise StageError(
                    f"a Ray worker loaded {spec!r} as {found}, not {expected} as the driver "
                    "sees it: every node must see the same model files (path and revision)"
                )
