"""Pipeline: the builder API (chaining methods, options, state and lifecycle).

Threads (see docs/design.md): the consumer calls ``next()`` on the thread that
iterates; one ``iopipe-loop`` thread per pipeline runs every stage's coroutine;
workers named after their stage (``iopipe-read_0``, ``iopipe-map_1``) do the
blocking work.  Data crosses from the loop to the consumer in exactly one place,
:class:`~iopipe.runtime.channels.Handoff`, one group (usually one batch) at a time.

The execution side lives beside it: :mod:`.engine` (the runtime the first
``iter()`` opens), :mod:`.epoch` (one pass over the source) and :mod:`.iterator`
(the consumer's ``next()``).
"""

from __future__ import annotations

import os
import weakref
from collections.abc import AsyncIterable, Callable, Iterable, Iterator, Mapping
from typing import Any, Generic, TypeVar

import torch

from ..control.autotune import MAX_AUTO_READS, auto_value, map_pool_size
from ..observe.verdict import StatsReporter
from ..runtime.errors import PipelineClosedError
from ..runtime.stats import PipelineStats
from ..runtime.watchdog import DEFAULT_STALL_WARNING_S
from ..stages.base import Stage
from ..stages.batch import Batcher
from ..stages.cache import Cache
from ..stages.decode import Decoder
from ..stages.device import DeviceTransfer
from ..stages.filter import Filter, FlatMap
from ..stages.prefetch import Prefetcher
from ..stages.reader import ChunkedReader
from ..stages.shuffle import ShuffleBuffer
from ..stages.source import Source
from .config import pipeline_from_config, pipeline_to_config
from .engine import Runtime, build_runtime
from .epoch import Epoch
from .iterator import EpochIterator
from .more import MoreSources
from .options import file_items
from .position import Resumable
from .shape import elements_per_epoch, items_in_flight_bound
from .spec import Options, PipelineSpec
from .trust import Trust

__all__ = ["Pipeline"]

T = TypeVar("T")
U = TypeVar("U")


class Pipeline(MoreSources, Resumable, Generic[T]):
    """A chain of stages on a background event loop; iterate it for one epoch.

    Build one with :meth:`from_files` or :meth:`from_iterable` and the chaining
    methods; each returns a new pipeline and starts nothing.  The first
    ``iter()`` starts the loop thread and the stages' workers, which stay up
    across epochs until :meth:`close` (or garbage collection, or interpreter
    exit).  Each ``iter()`` is one epoch; starting a new one stops the old.

    Thread-safety: iterate a pipeline from one thread at a time; :meth:`stats`
    and :meth:`close` may be called from any thread.

    Options (keywords of the constructor, :meth:`from_files` and :meth:`from_iterable`):
        ``timeout`` (seconds a ``next()`` may wait), ``handoff`` (groups waiting
        for the consumer), ``group_size`` (items that travel together between
        stages; default: the batch size, else 64), ``use_uvloop`` (``None``: when importable), ``stats_interval``
        (seconds between reports of the stats and the bottleneck verdict to
        the ``"iopipe"`` logger), ``on_stats`` (called with each report's
        :class:`PipelineStats`, on the loop thread: for TensorBoard, W&B),
        ``on_error`` (``"raise"``, the default: the first failing item
        stops the epoch; ``"skip"``: items whose read or map fails, and
        batches whose collate fails, are dropped, counted in the stats
        and logged), ``max_failures`` (with ``"skip"``: an int count, a
        float share in (0, 1) of the items seen, or None for no limit;
        past it the epoch raises :class:`TooManyFailures`; see "Failure
        policy" in docs/design.md),
        ``stall_warning`` (seconds, default 60; ``None``: off: when the
        consumer has waited that long for data, a warning on the
        ``"iopipe"`` logger names the stage and the items stuck there,
        repeated each interval; docs/reliability.md),
        ``max_inflight_bytes`` (bytes read and not yet handed to the
        consumer: in reads, queues, prefetch and the stages between;
        the reader waits while the bound is reached; a single item
        larger than the bound still passes, alone; docs/reliability.md),
        ``cpu_budget`` and ``memory_budget_bytes`` (bounds for ``"auto"``
        settings; default ``os.cpu_count()`` and 1 GiB; docs/tuning.md),
        ``fuse`` (default True: consecutive ``read``/thread ``map``/``batch``
        stages run as one job per group while reads hit the page cache;
        docs/design.md).
    """

    def __init__(
        self,
        source: Source,
        stages: tuple[Stage, ...] = (),
        *,
        timeout: float | None = None,
        handoff: int = 2,
        group_size: int | None = None,
        use_uvloop: bool | None = None,
        stats_interval: float | None = None,
        on_stats: Callable[[PipelineStats], Any] | None = None,
        cpu_budget: int | None = None,
        memory_budget_bytes: int | None = None,
        on_error: str = "raise",
        max_failures: int | float | None = None,
        stall_warning: float | None = DEFAULT_STALL_WARNING_S,
        max_inflight_bytes: int | None = None,
        fuse: bool = True,
    ) -> None:
        options = Options(
            timeout=timeout,
            handoff=handoff,
            group_size=group_size,
            use_uvloop=use_uvloop,
            stats_interval=stats_interval,
            on_stats=on_stats,
            cpu_budget=cpu_budget,
            memory_budget_bytes=memory_budget_bytes,
            on_error=on_error,
            max_failures=max_failures,
            stall_warning=stall_warning,
            max_inflight_bytes=max_inflight_bytes,
            fuse=fuse,
        )
        self._spec = PipelineSpec(source, tuple(stages), options)
        self._rt: Runtime | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self._closed = False
        self._epoch = 0
        self._skip = 0
        self._current: weakref.ref[EpochIterator[Any]] | None = None
        self._last: Epoch | None = None  # for stats()
        self._position: Epoch | None = None  # the epoch whose position state_dict() reports

    # -- construction ------------------------------------------------------------
    @classmethod
    def from_files(
        cls,
        paths: str | os.PathLike[str] | Iterable[Any],
        *,
        shuffle: bool = False,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        shard: str = "pad",
        allow_empty: bool = False,
        **options: Any,
    ) -> Pipeline[str]:
        """Start a pipeline over files.

        Args:
            paths: A glob (``**`` recursive), a directory (every file below it), a
                file, or a list of paths and ``(path, offset, length)`` byte ranges.
                Globs and directories are listed once, now, and sorted.
            shuffle: Visit the files in an order drawn from ``(seed, epoch)``.
            seed: The shuffle's seed.
            rank, world_size, shard: This process's share (see :class:`Source`).
            allow_empty: Let a glob or directory that matches no file give empty
                epochs; by default it raises FileNotFoundError naming the pattern.
            **options: Pipeline options (see :class:`Pipeline`).

        Raises:
            FileNotFoundError: a path does not exist, or a glob or directory
                matched no file (unless ``allow_empty``).
            ValueError: ``paths`` is an empty list (unless ``allow_empty``).
            TypeError: ``paths`` is neither a path nor an iterable of paths.
        """
        items = file_items(paths, allow_empty)
        src = Source(
            items, shuffle=shuffle, seed=seed, rank=rank, world_size=world_size, shard=shard
        )
        src.origin = {"files": os.fspath(paths) if isinstance(paths, str | os.PathLike) else items}
        if allow_empty:
            src.origin["allow_empty"] = True
        return Pipeline(src, **options)

    @classmethod
    def from_iterable(
        cls,
        items: Iterable[U] | AsyncIterable[U],
        *,
        shuffle: bool = False,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        shard: str = "pad",
        **options: Any,
    ) -> Pipeline[U]:
        """Start a pipeline over any iterable or async iterable.

        Sequences (lists, tuples, ranges) have a length and can be shuffled;
        other iterables are pulled a group at a time in a worker thread, and
        async iterables on the loop.  See :meth:`from_files` for the arguments.
        """
        src = Source(
            items, shuffle=shuffle, seed=seed, rank=rank, world_size=world_size, shard=shard
        )
        return Pipeline(src, **options)

    @classmethod
    def from_config(
        cls,
        config: Mapping[str, Any] | str | os.PathLike[str],
        *,
        allow: Iterable[str] | str | None = None,
        trusted: bool = False,
    ) -> Pipeline[Any]:
        """Build a pipeline from a config: a mapping, or a ``.toml``/``.json``/``.yaml`` file.

        See docs/config.md for the format.  User functions are named
        ``"package.module:function"``; sizes may be written ``"4MiB"``.

        A config is data, so it may name functions only from the modules in
        ``allow`` (each with every module below it: ``allow=["myproject"]``)
        and a few pure built-ins (``"builtins:len"``); ``trusted=True`` lifts
        the limit for a config as trusted as code.  Nothing is imported before
        the whole config is checked, and a module not allowed is never imported.

        Raises:
            ConfigError: the config is invalid, or names a function it may not;
                the message starts with the key path (``stages[2].concurrency:
                expected an int >= 1 or 'auto', got 'x'``).
            FileNotFoundError: the config file, or the source's files, do not exist.
        """
        pipe, origin = pipeline_from_config(config, cls, Trust.of(allow, trusted))
        pipe.source.origin = origin
        return pipe

    def to_config(self) -> dict[str, Any]:
        """Return this pipeline's config as plain data (``from_config`` of it rebuilds it).

        Raises:
            ConfigError: a part has no config form (a lambda, an arbitrary iterable source).
        """
        return pipeline_to_config(self._spec)

    @property
    def source(self) -> Source:
        """The source this chain starts from (each running pipeline reads a fresh copy)."""
        return self._spec.source

    def _then(self, stage: Stage) -> Pipeline[Any]:
        spec = self._spec.then(stage)
        return Pipeline(spec.source, spec.stages, **spec.options.as_dict())

    def read(
        self,
        *,
        chunk_bytes: int = 4 << 20,
        concurrency: int | str = 16,
        with_source: bool = False,
    ) -> Pipeline[Any]:
        """Read each item (a path or ``(path, offset, length)``) into a ``uint8`` numpy buffer.

        Args:
            chunk_bytes: The largest single ``preadv``.  Items larger than this
                are read in pieces, concurrently, into one buffer: a piece is one
                chunk, or, when an item has more chunks than there are workers,
                whole chunks adding up to about 1 MiB (one job, one ``preadv``
                each), so the jobs of an item do not grow with its size over
                ``chunk_bytes``.
            concurrency: Reads in flight, or ``"auto"`` (tuned while running, see
                docs/tuning.md).
            with_source: Yield ``(item, buffer)`` pairs instead of buffers.
        """
        n, auto = auto_value(concurrency, MAX_AUTO_READS)
        stage = ChunkedReader(chunk_bytes=chunk_bytes, concurrency=n, with_source=with_source)
        stage.autotune = auto
        return self._then(stage)

    def prefetch(self, n: int | str) -> Pipeline[T]:
        """Keep up to ``n`` finished elements ready ahead of the consumer (``"auto"``: tuned)."""
        size, auto = auto_value(n, 1, param="prefetch size")
        stage = Prefetcher(size)
        stage.autotune = auto
        return self._then(stage)

    def map(
        self,
        fn: Callable[[T], U],
        *,
        concurrency: int | str = 4,
        executor: str | None = None,
        ordered: bool = True,
        name: str | None = None,
    ) -> Pipeline[U]:
        """Apply ``fn`` to every element.

        Args:
            fn: A function of one element.  ``async def`` functions are awaited
                on the loop.  For ``executor="process"`` it must be picklable.
            concurrency: Jobs in flight (threads, processes or awaits), or ``"auto"``
                (tuned while running within ``cpu_budget``, see docs/tuning.md).
            executor: ``"thread"`` (default for sync functions), ``"process"``,
                ``"async"`` (default for async functions) or ``"inline"`` (on
                the loop thread: for functions that take microseconds).
            ordered: Keep input order (default); ``False`` yields in completion order.
            name: Stage name in stats and errors (default ``"map"``).
        """
        n, auto = auto_value(
            concurrency, map_pool_size(fn, executor, self._spec.options.cpu_budget)
        )
        stage = Decoder(fn, concurrency=n, executor=executor, ordered=ordered, name=name)
        stage.autotune = auto
        return self._then(stage)

    def filter(self, pred: Callable[[T], Any], **map_options: Any) -> Pipeline[T]:
        """Keep the elements ``pred`` is true for (options as :meth:`map`; docs/shards.md)."""
        return self._then(Filter(pred, **map_options))

    def flat_map(self, fn: Callable[[T], Iterable[U]], **map_options: Any) -> Pipeline[U]:
        """Each element replaced by the elements ``fn`` returns for it (docs/shards.md)."""
        return self._then(FlatMap(fn, **map_options))

    def shuffle(self, buffer: int, *, seed: int = 0) -> Pipeline[T]:
        """Shuffle within a buffer of ``buffer`` elements, by ``(seed, epoch)`` (docs/shards.md)."""
        return self._then(ShuffleBuffer(buffer, seed=seed))

    def batch(
        self,
        batch_size: int,
        *,
        drop_last: bool = False,
        collate_fn: Callable[[list[T]], Any] | None = None,
    ) -> Pipeline[Any]:
        """Group elements into batches of ``batch_size``, collated by ``collate_fn``.

        Without ``collate_fn`` torch's ``default_collate`` is used, as in
        ``torch.utils.data.DataLoader``.
        """
        return self._then(Batcher(batch_size, drop_last=drop_last, collate_fn=collate_fn))

    def cache(self, *, max_bytes: int) -> Pipeline[T]:
        """Keep the output of the stages so far in memory, up to ``max_bytes``.

        Later epochs take the cached items without running those stages again.
        Must come before any ``batch()``.

        Raises:
            ValueError: a batcher precedes the cache, or a cache already exists.
        """
        after = [s.kind for s in self._spec.stages if not s.one_to_one]
        if after:
            raise ValueError(
                f"cache() must come before {after[0]}(): it keys outputs by source item"
            )
        if any(s.serves_source for s in self._spec.stages):
            raise ValueError("a pipeline can have only one cache()")
        return self._then(Cache(max_bytes=max_bytes))

    def to_device(self, device: str | torch.device, *, pin_memory: bool = False) -> Pipeline[T]:
        """Copy every tensor of each element to ``device`` on a side CUDA stream.

        The copy runs in a worker thread and has completed when the element is
        handed out.  With ``pin_memory`` tensors are pinned first.  Without CUDA
        this only accepts ``"cpu"`` and does nothing.
        """
        return self._then(DeviceTransfer(device, pin_memory=pin_memory))

    # -- iteration ---------------------------------------------------------------
    @property
    def group_size(self) -> int:
        """Items per group: as given, else the first batch size, else 64 (docs/design.md)."""
        return self._spec.group_size

    def _runtime(self) -> Runtime:
        if self._closed:
            raise PipelineClosedError("this pipeline was closed")
        if self._rt is not None and self._rt.pid != os.getpid():
            self._forget_inherited()
        if self._rt is None:
            self._rt = build_runtime(self._spec)
            self._finalizer = weakref.finalize(self, self._rt.shutdown)
        return self._rt

    def _forget_inherited(self) -> None:
        """Drop a runtime inherited through ``os.fork()``; the next one is this process's own.

        Nothing of it is touched: its threads exist only in the parent, and the
        locks they held at the fork stay held here.
        """
        if self._finalizer is not None:
            self._finalizer.detach()
        self._rt, self._finalizer, self._current = None, None, None

    def __iter__(self) -> Iterator[T]:
        """Start an epoch and return its iterator (stopping any epoch still running)."""
        rt = self._runtime()
        self.stop_epoch()
        ep = rt.start_epoch(self._epoch, self._skip, self._spec.options.handoff)
        self._epoch += 1
        self._skip = 0
        self._last = self._position = ep
        it: EpochIterator[T] = EpochIterator(
            ep,
            self._spec.options.timeout,
            self._spec.options.stall_warning,
            closed=self._is_closed,
            current=self._iterator,
        )
        self._current = weakref.ref(it)
        interval, on_stats = self._spec.options.stats_interval, self._spec.options.on_stats
        if interval is not None or on_stats is not None:
            StatsReporter(self, ep, interval, on_stats).start()
        return it

    def stop_epoch(self) -> None:
        """End the epoch in progress, if any (its iterator stops); ``iter()`` starts the next."""
        it = self._iterator()
        if it is not None:
            it.close()

    def _iterator(self) -> EpochIterator[Any] | None:
        """The iterator of the epoch started last (None after ``load_state_dict`` or a fork)."""
        return self._current() if self._current is not None else None

    def _is_closed(self) -> bool:
        return self._closed

    def __len__(self) -> int:
        """Elements per epoch: items, or batches after ``batch()``.

        Raises:
            TypeError: the source's length is unknown.
        """
        return elements_per_epoch(len(self._spec.source), self._spec.stages)

    # -- introspection and lifecycle --------------------------------------------
    @property
    def max_items_in_flight(self) -> int:
        """Upper bound on source items alive between the source and the consumer.

        The sum of every stage's window and every queue's capacity (each queue
        may take one group beyond it when empty), plus the consumer's group.
        """
        return items_in_flight_bound(self._spec.stages, self.group_size, self._spec.options.handoff)

    def stats(self) -> PipelineStats:
        """Return a snapshot of every stage's counters (callable during iteration)."""
        ep = self._last
        rt = self._rt
        if ep is None or rt is None:
            return PipelineStats((), 0.0, 0, 0.0, self._epoch)
        return ep.stats()

    def close(self) -> None:
        """Stop the running epoch, join every thread and release workers (idempotent).

        Bounded: waits at most about 10 s for work in flight to finish.
        """
        self._closed = True
        self.stop_epoch()
        if self._finalizer is not None:
            self._finalizer()

    def __enter__(self) -> Pipeline[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        chain = " -> ".join(["source", *(s.name for s in self._spec.stages)])
        return f"<iopipe.Pipeline {chain}>"
