"""A papermill engine that neither hangs after a widget cell nor fails on a kernel's port race.

Use it as ``papermill --engine mergelib ...``.

It fixes two intermittent failures of papermill's own engine.

**A missed reply.** papermill executes notebooks through nbclient, which waits for each cell's
``execute_reply`` with one long ``get_msg(timeout=...)`` on the kernel's shell channel (the whole
execution timeout, or forever when there is none). Intermittently, most often right after a cell that
displays ipywidgets, that wait misses the wake-up of a reply that has already arrived: the kernel is
idle, the reply sits in the socket, and papermill waits until the timeout, or forever (nbclient issue
#312; we saw it several times while executing the course notebooks). Asking again for the message finds
it at once.

This engine polls the shell channel in short slices (``POLL_S``) until the same overall timeout, so a
missed wake-up costs at most ``POLL_S`` seconds.

**A kernel that dies at start.** jupyter_client picks a kernel's five TCP ports by binding port 0 and
closing the socket; the kernel binds them a moment later. A kernel started at the same time by another
process (a sweep's process pool, a test runner's other worker) can take one of them in between; the
new kernel then fails with "Address already in use" and dies before its first reply, and no cell runs
(papermill issue #511, jupyter_client #487: a few per cent of notebooks when many start at once). This
engine starts such a kernel again, with fresh ports, up to ``KERNEL_START_ATTEMPTS`` times in all. Only
the start is retried: once a cell has run, any failure is the notebook's.

Everything else (parameters, output notebook written as cells finish, timeouts, errors) is papermill's.
``make notebooks`` and ``python -m mergelib.sweep`` use it; it is registered as papermill's ``mergelib``
engine in ``pyproject.toml``.
"""
from __future__ import annotations

import functools
import inspect
from queue import Empty
from time import monotonic

__all__ = ["POLL_S", "KERNEL_START_ATTEMPTS", "sliced_get_msg", "MergelibEngine"]

POLL_S = 2.0
KERNEL_START_ATTEMPTS = 3


def sliced_get_msg(get_msg, poll_s: float = POLL_S):
    """Wrap an async ``get_msg(timeout=None)`` so that it waits in slices of at most ``poll_s`` seconds.

    Same contract as the wrapped function: returns the next message, or raises ``queue.Empty`` once
    ``timeout`` seconds have passed (never, when ``timeout`` is None).
    """
    if poll_s <= 0:
        raise ValueError(f"poll_s must be > 0, got {poll_s}")

    async def get(timeout: float | None = None, **kwargs):
        end = None if timeout is None else monotonic() + float(timeout)
        while True:
            wait = poll_s if end is None else min(poll_s, max(0.0, end - monotonic()))
            try:
                msg = get_msg(timeout=wait, **kwargs)
                return await msg if inspect.isawaitable(msg) else msg
            except Empty:
                if end is not None and monotonic() >= end:
                    raise

    get.sliced = True
    return get


@functools.cache
def _engine():
    from nbclient.util import run_sync
    from papermill.clientwrap import PapermillNotebookClient
    from papermill.engines import NBClientEngine
    from papermill.log import logger
    from papermill.utils import merge_kwargs, remove_args

    class Client(PapermillNotebookClient):
        async def async_start_new_kernel_client(self):
            # nbclient raises RuntimeError when the kernel dies or does not answer before its first
            # reply, after shutting it down and dropping its manager (so the next one gets new ports)
            for attempt in range(1, KERNEL_START_ATTEMPTS + 1):
                try:
                    return await super().async_start_new_kernel_client()
                except RuntimeError as exc:
                    if attempt == KERNEL_START_ATTEMPTS:
                        raise RuntimeError(f"the kernel {self.kernel_name!r} failed to start "
                                           f"{KERNEL_START_ATTEMPTS} times; the last time: {exc}") from exc
                    logger.warning("kernel %r failed to start (%s); starting it again with fresh ports "
                                   "(attempt %d of %d)", self.kernel_name, exc, attempt + 1, KERNEL_START_ATTEMPTS)
                    self.km = self.create_kernel_manager()
                    await self.async_start_new_kernel()

        start_new_kernel_client = run_sync(async_start_new_kernel_client)  # what papermill's setup calls

        def papermill_execute_cells(self):
            channel = self.kc.shell_channel
            if not getattr(channel.get_msg, "sliced", False):
                channel.get_msg = sliced_get_msg(channel.get_msg)
            return super().papermill_execute_cells()

    class MergelibEngine(NBClientEngine):
        """papermill's nbclient engine, executing with :class:`Client` (shell replies polled in slices,
        a kernel that dies at start started again)."""

        @classmethod
        def execute_managed_notebook(cls, nb_man, kernel_name, log_output=False, stdout_file=None,
                                     stderr_file=None, start_timeout=60, execution_timeout=None, **kwargs):
            # the arguments are mapped as papermill's NBClientEngine maps them
            kwargs = remove_args(["input_path"], **kwargs)
            safe_kwargs = remove_args(["timeout", "startup_timeout"], **kwargs)
            final_kwargs = merge_kwargs(safe_kwargs, timeout=execution_timeout or kwargs.get("timeout"),
                                        startup_timeout=start_timeout, kernel_name=kernel_name, log=logger,
                                        log_output=log_output, stdout_file=stdout_file, stderr_file=stderr_file)
            return Client(nb_man, **final_kwargs).execute()

    return MergelibEngine


def __getattr__(name):          # papermill is imported only when the engine is used
    if name == "MergelibEngine":
        return _engine()
    raise AttributeError(name)
