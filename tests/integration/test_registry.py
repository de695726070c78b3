"""The model registry against a real Redis: versions beyond ``keep`` are dropped with their artifacts,
never the champion, in the same transaction as the publication."""

from __future__ import annotations

import redis

from schemas import Stage
from services.runtime.registry import ModelRegistry, Signer
from tests.conftest import SIGNING_KEY


def test_publish_keeps_the_newest_versions_and_the_champion(redis_server, prefix):
    client = redis.Redis.from_url(redis_server.url)
    registry = ModelRegistry(client, Signer(SIGNING_KEY.encode()), prefix.rstrip("."))
    champion = registry.publish("m", {"v": 1}, stage=Stage.champion, examples_seen=1, spec_hash="h", keep=5)
    for i in range(2, 13):
        registry.publish("m", {"v": i}, stage=Stage.challenger, examples_seen=i, spec_hash="h", keep=5)
    assert registry.champion("m") == champion.version == 1
    assert registry.versions("m") == [1, 8, 9, 10, 11, 12]
    assert registry.load("m", 1) == {"v": 1} and registry.load("m", 12) == {"v": 12}
    for dropped in range(2, 8):  # the artifacts go with their index entries
        assert not client.exists(f"{registry.ns}:model:m:v:{dropped}")
    # a new champion: the old one is an ordinary old version again and goes at the next publication
    registry.publish("m", {"v": 13}, stage=Stage.champion, examples_seen=13, spec_hash="h", keep=5)
    registry.publish("m", {"v": 14}, stage=Stage.challenger, examples_seen=14, spec_hash="h", keep=5)
    assert registry.champion("m") == 13
    assert registry.versions("m") == [10, 11, 12, 13, 14]
    assert registry.meta("m", 14)["examples_seen"] == 14
