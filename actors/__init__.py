"""Ray actors and every ray.* call: shard, router, sinks, supervisor, gateway, Serve scorer.

Importing this package sets Arrow's allocator option (``runtime.MIMALLOC_ENV``) in a process
that has not loaded pyarrow yet: a Ray worker imports this package before the shard or sink
module that loads pyarrow, and mimalloc reads its options once, when it starts. The actors set
glibc's through ``mallopt`` when they start (``runtime.tune_allocator``). Setting both in the
process instead of a ``runtime_env`` saves each new actor 1-1.5 s of runtime-environment setup
(a spare shard is ready that much sooner).
"""

import os as _os

from actors.runtime import MIMALLOC_ENV as _MIMALLOC_ENV

for _name, _value in _MIMALLOC_ENV.items():
    _os.environ.setdefault(_name, _value)
