"""Backend resolution: AUTO chooses; an explicitly requested backend that cannot run raises.

    resolve_backend("sdpa", requested, {"triton": check_fn, "reference": check_fn})

Candidates are tried in the order given for AUTO. A requested backend that cannot run raises
BackendUnavailable with the capability's reason: never a silent fallback.
"""

from __future__ import annotations

import logging
from typing import Callable, Mapping

from .capability import Capability

AUTO = "auto"
log = logging.getLogger("fewer")
_logged: set[tuple[str, str]] = set()


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run here; the message says why."""


def resolve_backend(op: str, requested: str | None,
                    candidates: Mapping[str, Callable[[], Capability]]) -> str:
    requested = AUTO if requested is None else str(requested).lower()
    if requested != AUTO and requested not in candidates:
        raise ValueError(f"{op}: unknown backend {requested!r}; choose 'auto' or one of {list(candidates)}")
    if requested != AUTO:
        ok, reason = candidates[requested]()
        if not ok:
            raise BackendUnavailable(f"{op}: backend {requested!r} cannot run here: {reason}")
        chosen = requested
    else:
        reasons = []
        for name, check in candidates.items():
            ok, reason = check()
            if ok:
                chosen = name
                break
            reasons.append(f"{name}: {reason}")
        else:
            raise BackendUnavailable(f"{op}: no backend can run here ({'; '.join(reasons)})")
    if (op, chosen) not in _logged:
        _logged.add((op, chosen))
        log.info("fewer: %s uses backend %r", op, chosen)
    return chosen
