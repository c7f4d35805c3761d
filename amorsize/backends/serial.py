"""Serial backend: runs every task in the calling thread, with no pickling at all."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, ClassVar

from amorsize.backends._wire import TaskFeed
from amorsize.backends.base import Backend, OkValues, Outcome, Pause, Task, run_chunk_fast


class SerialBackend(Backend):
    """Run tasks one after the other in the calling thread.

    Exceptions keep their own traceback (nothing crosses a process boundary).

    >>> from amorsize.backends.base import Task
    >>> [list(o) for _, o in SerialBackend().run(abs, iter([Task(0, [-1, -2])]), n_jobs=1,
    ...                                             max_in_flight=1)]
    [[1, 2]]
    """

    name: ClassVar[str] = "serial"
    supports_pause: ClassVar[bool] = True

    def run(
        self,
        func: Callable[[Any], Any],
        tasks: Iterator[Task | Pause],
        *,
        n_jobs: int,
        max_in_flight: int,
    ) -> Iterator[tuple[Task, list[Outcome] | OkValues]]:
        """Yield each task with its outcomes as soon as it has run."""
        # Nothing is ever in flight when the next task is pulled, so a pause is an error.
        feed = TaskFeed(tasks)
        while (task := feed.pull()) is not None:
            yield task, run_chunk_fast(func, task.items, remote=False)
        feed.finish()
