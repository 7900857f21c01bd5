"""frozen_heap(): keep the objects built at startup out of the cyclic garbage collector's way.

CPython's collector stops the process (the event loop and any thread that wants the GIL back)
while it walks every tracked object of the generation it collects. At startup the service
imports FastAPI, pydantic, onnxruntime and numpy and loads a model: ~83,000 tracked objects that
live as long as the process. Under load a full (generation 2) collection comes every few tens of
seconds and walks them all, the event loop stopped throughout: 40-55 ms with the service idle on
the 2-core reference machine, 66-105 ms under load with the graph threads competing for the cores
(docs/performance.md, "Garbage collector pauses").
gc.freeze() moves them to a permanent generation that collections skip; the same full collection
then takes ~0.1 ms. Reference counting still frees a frozen object that is no longer used; only a
reference cycle among frozen objects would wait for gc.unfreeze().

A model loaded later by a hot reload is not frozen: it adds ~1,700 tracked objects, which a
collection walks in ~0.15 ms, and dropping a model leaves no cycles behind (both measured).
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import Iterator

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """Collect once, freeze what is left for the duration of the block, unfreeze at its end.

    Entered by the app's lifespan once the model, the Redis client and the threads exist, so
    everything built at startup is frozen and the requests' own objects are not. Unfreezing at
    shutdown gives the collector back what the app held (several apps come and go in one test
    process; in production the process ends anyway).
    """
    gc.collect()
    gc.freeze()
    logger.debug("%d startup objects frozen out of garbage collection", gc.get_freeze_count())
    try:
        yield
    finally:
        gc.unfreeze()
