"""PromptCache: longest-prefix lookup, LRU eviction by bytes, replacement of extended entries."""

from __future__ import annotations

import msgspec
import pytest

from meshnode.engines.launch import EngineLaunch
from meshnode.engines.prompt_cache import MIB, PromptCache, common_prefix


def test_common_prefix() -> None:
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 2
    assert common_prefix([], [1]) == 0
    assert common_prefix([5], [1]) == 0


def test_lookup_picks_the_longest_common_prefix() -> None:
    cache = PromptCache(1000)
    cache.save([1, 2, 3, 4, 5], "a", 10)
    cache.save([1, 2, 9, 9, 9, 9, 9], "b", 10)
    cache.save([7, 7, 7], "c", 10)
    hit = cache.lookup([1, 2, 3, 4, 8, 8])
    assert hit is not None
    entry, n = hit
    assert (entry.state, n) == ("a", 4)
    entry, n = cache.lookup([1, 2, 9, 9, 0])  # type: ignore[misc]
    assert (entry.state, n) == ("b", 4)
    assert cache.lookup([3, 3, 3]) is None


def test_lookup_leaves_the_last_prompt_token_to_evaluate() -> None:
    cache = PromptCache(1000)
    cache.save([1, 2, 3, 4, 5], "a", 10)
    hit = cache.lookup([1, 2, 3])  # the entry extends the whole prompt
    assert hit is not None and hit[1] == 2
    assert cache.lookup([1]) is None  # nothing usable: the only token must be evaluated


def test_lookup_must_beat_the_live_context() -> None:
    cache = PromptCache(1000)
    cache.save([1, 2, 3, 4], "a", 10)
    assert cache.lookup([1, 2, 3, 4, 5], better_than=4) is None
    assert cache.lookup([1, 2, 3, 4, 5], better_than=3) is not None


def test_ties_go_to_the_most_recently_used() -> None:
    cache = PromptCache(1000)
    cache.save([1, 2, 3, 8], "old", 10)
    cache.save([1, 2, 3, 9], "new", 10)
    hit = cache.lookup([1, 2, 3, 7])
    assert hit is not None and hit[0].state == "new"


def test_saving_an_extension_replaces_the_entries_it_extends() -> None:
    cache = PromptCache(1000)
    cache.save([1, 2], "turn1", 10)
    cache.save([1, 2, 3, 4], "turn2", 20)
    cache.save([1, 5], "other", 10)
    assert [1, 2] not in cache and [1, 2, 3, 4] in cache and [1, 5] in cache
    assert cache.used_bytes == 30 and len(cache) == 2


def test_saving_a_prefix_of_an_entry_keeps_the_entry_and_refreshes_it() -> None:
    cache = PromptCache(30)
    cache.save([1, 2, 3, 4], "long", 10)
    cache.save([5], "x", 10)
    assert cache.save([1, 2], "short", 10) is False
    assert [1, 2] not in cache and cache.used_bytes == 20
    cache.save([6], "y", 10)
    cache.save([7], "z", 10)  # evicts [5] (least recently used), not the refreshed entry
    assert [1, 2, 3, 4] in cache and [5] not in cache


def test_lru_eviction_by_bytes() -> None:
    cache = PromptCache(100)
    cache.save([1], "a", 40)
    cache.save([2], "b", 40)
    assert cache.lookup([1, 0]) is not None  # [1] is now the most recently used
    cache.save([3], "c", 40)  # 120 > 100: evict the least recently used, [2]
    assert [1] in cache and [2] not in cache and [3] in cache
    assert cache.used_bytes == 80 <= cache.budget_bytes
    cache.save([4], "d", 100)  # takes the whole budget
    assert len(cache) == 1 and cache.used_bytes == 100


def test_a_state_larger_than_the_budget_is_not_kept() -> None:
    cache = PromptCache(100)
    cache.save([1], "a", 40)
    assert cache.save([2], "big", 101) is False
    assert [1] in cache and [2] not in cache and cache.used_bytes == 40


def test_budget_zero_disables_the_cache() -> None:
    cache = PromptCache.from_mb(0)
    assert not cache.enabled
    assert cache.save([1, 2, 3], "a", 0) is False
    assert len(cache) == 0 and cache.lookup([1, 2, 3, 4]) is None


def test_empty_tokens_are_not_kept() -> None:
    cache = PromptCache(100)
    assert cache.save([], "a", 1) is False
    assert len(cache) == 0


def test_from_mb_counts_mebibytes() -> None:
    assert PromptCache.from_mb(3).budget_bytes == 3 * MIB


@pytest.mark.parametrize("bad", [-1, 1.5, "256", None, True])
def test_bad_budgets_are_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="0 disables"):
        PromptCache.from_mb(bad)  # type: ignore[arg-type]


def test_bad_byte_budgets_are_refused() -> None:
    with pytest.raises(ValueError, match=">= 0"):
        PromptCache(-1)
    with pytest.raises(TypeError):
        PromptCache(1.0)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [-1, 1.5, "x", None])
def test_a_bad_size_changes_nothing(bad: object) -> None:
    cache = PromptCache(100)
    cache.save([1], "a", 10)
    with pytest.raises(ValueError, match="number of bytes"):
        cache.save([1, 2], "b", bad)  # type: ignore[arg-type]
    assert [1] in cache and len(cache) == 1 and cache.used_bytes == 10


def test_engine_launch_carries_the_budget() -> None:
    assert EngineLaunch(engine="llama.cpp", model_path="m", served_name="s").prompt_cache_mb == 256
    launch = EngineLaunch(engine="llama.cpp", model_path="m", served_name="s", prompt_cache_mb=0)
    assert EngineLaunch.from_json(launch.to_json()).prompt_cache_mb == 0
    bad = launch.to_json().replace('"prompt_cache_mb":0', '"prompt_cache_mb":-5')
    with pytest.raises(msgspec.ValidationError, match="prompt_cache_mb"):
        EngineLaunch.from_json(bad)


def test_node_config_takes_the_budget_from_env_and_flags(tmp_path) -> None:
    from meshnode.node import ConfigError, load_config
    env = {"MESHNODE_PROMPT_CACHE_MB": "64", "MESHNODE_DATA_DIR": str(tmp_path)}
    assert load_config(env=env).prompt_cache_mb == 64
    assert load_config({"prompt_cache_mb": 0}, env=env).prompt_cache_mb == 0
    assert load_config(env={"MESHNODE_DATA_DIR": str(tmp_path)}).prompt_cache_mb == 256
    with pytest.raises(ConfigError, match="prompt_cache_mb"):
        load_config(env={**env, "MESHNODE_PROMPT_CACHE_MB": "-1"})
