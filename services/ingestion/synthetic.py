"""A synthetic shop clickstream for the ``clickstream`` spec: the tests, the benchmark and demos.

Deterministic for a seed. Event time moves forward ~``gap_s`` per event across all users; a fraction
of events arrives out of order: some within the spec's grace periods, some far beyond them (too
late for some or all windows), so that every lateness path is exercised.

>>> events = clickstream(3, users=2, seed=1, run_id="doc")
>>> [(e["entity_id"], e["type"], e["data"]["page"]) for e in events]
[('user-1', 'page_view', 'product'), ('user-1', 'page_view', 'home'), ('user-0', 'page_view', 'home')]
"""

from __future__ import annotations

import random
from typing import Any

PAGES = ("home", "search", "product", "cart", "checkout")
_WEIGHTS = (3, 3, 5, 2, 1)
_TYPES = {"cart": "add_to_cart", "checkout": "purchase"}


def clickstream(n: int, users: int = 50, seed: int = 7, start_ts: float = 1_700_000_000.0,
                gap_s: float = 0.5, late_within: float = 0.05, late_beyond: float = 0.03,
                items: int = 40, run_id: str = "synthetic") -> list[dict[str, Any]]:
    """``n`` events of ``users`` users in the streamlearn event envelope."""
    rng = random.Random(seed)
    t = start_ts
    out = []
    for i in range(n):
        t += rng.expovariate(1.0 / gap_s)
        ts = t
        roll = rng.random()
        if roll < late_within:
            ts = t - rng.uniform(0.0, 60.0)  # within some grace periods (10 s, 30 s, 60 s)
        elif roll < late_within + late_beyond:
            ts = t - rng.uniform(60.0, 900.0)  # beyond them: too late for some or all windows
        page = rng.choices(PAGES, _WEIGHTS)[0]
        data: dict[str, Any] = {
            "page": page,
            "price": round(rng.uniform(1.0, 500.0), 2) if page in ("product", "cart") else 0.0,
            "dwell_s": round(rng.expovariate(1.0 / 20.0), 3),
        }
        if page in ("product", "cart"):
            data["item"] = f"item-{rng.randrange(items)}"
        out.append({"schema_version": 1, "event_id": f"click-{run_id}-{i:07d}",
                    "entity_id": f"user-{rng.randrange(users)}", "ts": round(ts, 3),
                    "type": _TYPES.get(page, "page_view"), "data": data})
    return out
