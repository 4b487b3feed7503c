"""The pass cache's size limit and disk checks: least-recently-used eviction, refusals before
anything is written, the byte counters and ``python -m compression.cache``. Tiny entries (kB)
in a temporary folder; the disk is never filled: its free space is faked or the reserve raised."""
from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import pytest
import torch

from compression import cache
from compression.cache import CacheSpaceError, entry_path, load_entry, main, save_entry
from compression.features import BlockFeatures, FeatureWriter
from grouplasso import LassoStats


@pytest.fixture(autouse=True)
def fresh(monkeypatch: pytest.MonkeyPatch) -> None:
    """Counters from zero, and no reserve, so that a nearly full test disk changes nothing."""
    monkeypatch.setattr(cache, "RESERVE_BYTES", 0)
    cache.counts.reset()


def description(i: int, split: str = "train", layer: Optional[str] = "classifier.1") -> dict[str, Any]:
    return {"weights": hashlib.sha256(str(i).encode()).hexdigest(), "layer": layer, "dataset": "ToyDataModule",
            "root": "/data", "split": split, "indices": "0" * 64, "transform": "None", "samples": 20}


def stats(values: int = 10_000) -> dict[str, Any]:
    """A statistics entry of about ``values`` x 4 bytes."""
    return {"loss": 0.5, "accuracy": 0.9, "n": 20, "stats": {"classifier.1": {"G": torch.ones(values)}}}


def feature_set(folder: Path, i: int, samples: int = 20, features: int = 50,
                max_bytes: Optional[int] = None) -> BlockFeatures:
    """Head inputs (``samples`` x ``features`` float32) written as ``DataPasses.features`` writes them."""
    meta = description(i, layer="head-classifier")
    writer = FeatureWriter(entry_path(folder, meta, suffix="-rank0of1"), samples=samples, max_bytes=max_bytes,
                           description=meta)
    for start in range(0, samples, 8):
        size = min(8, samples - start)
        writer.write(torch.randn(size, features), torch.arange(size))
    return writer.close()


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir())


def age(path: Path, seconds: float) -> None:
    """Make ``path`` last used ``seconds`` ago (its modification time)."""
    t = time.time() - seconds
    os.utime(path, (t, t))


def test_the_least_recently_used_entry_goes_first_and_reading_makes_an_entry_recent(tmp_path):
    size = save_entry(tmp_path, description(0), stats()).stat().st_size
    limit = int(3.5 * size)  # three entries fit, four do not
    paths = [save_entry(tmp_path, description(i), stats(), max_bytes=limit) for i in range(3)]
    for path, seconds in zip(paths, (300, 200, 100)):  # 0 is the oldest, then 1, then 2
        age(path, seconds)
    assert load_entry(tmp_path, description(0)) is not None  # now 0 is the most recent
    save_entry(tmp_path, description(3), stats(), max_bytes=limit)
    assert [p.is_file() for p in paths] == [True, False, True]  # 1 was the least recently used
    save_entry(tmp_path, description(4), stats(), max_bytes=limit)
    assert [p.is_file() for p in paths] == [True, False, False]
    assert cache.counts.evicted == 2 * size


def test_a_file_that_describes_something_else_is_ignored_never_trusted(tmp_path):
    path = save_entry(tmp_path, description(0), stats())
    assert load_entry(tmp_path, description(0)) is not None
    saved = torch.load(path, weights_only=True)
    saved["description"]["samples"] += 1  # the file now claims other samples
    torch.save(saved, path)
    assert load_entry(tmp_path, description(0)) is None


def test_statistics_are_stored_as_half_of_g_and_read_back_exactly(tmp_path):
    g = torch.Generator().manual_seed(0)
    X, Y = torch.randn(300, 120, generator=g, dtype=torch.float64), torch.randn(300, 2, generator=g, dtype=torch.float64)
    layer = LassoStats.from_features(torch.relu(X), Y, group=3)
    whole = save_entry(tmp_path / "whole", description(0), {"stats": {"x": {**vars(layer)}}}).stat().st_size
    half = save_entry(tmp_path / "half", description(0), {"stats": {"x": layer.to_stored()}}).stat().st_size
    assert half < 0.55 * whole  # G is 120 x 120, C only 2 x 120
    for folder in ("whole", "half"):  # the older whole-G entries still read
        back = LassoStats.from_stored(load_entry(tmp_path / folder, description(0))["stats"]["x"])
        assert torch.equal(back.G, layer.G) and torch.equal(back.C, layer.C)
        assert (back.s, back.n, back.group) == (layer.s, layer.n, layer.group)


def test_the_limit_holds_after_many_writes_of_both_kinds(tmp_path):
    size = save_entry(tmp_path / "probe", description(0), stats()).stat().st_size
    limit = int(3.5 * size)
    for i in range(12):
        save_entry(tmp_path / "cache", description(i), stats(), max_bytes=limit)
        feature_set(tmp_path / "cache", i, samples=40, features=60, max_bytes=limit)  # about 10 kB
        assert folder_bytes(tmp_path / "cache") <= limit
        assert sum(e.bytes for e in cache.entries(tmp_path / "cache")) == folder_bytes(tmp_path / "cache")
    assert load_entry(tmp_path / "cache", description(11)) is not None  # the newest stay
    assert BlockFeatures.exists(entry_path(tmp_path / "cache", description(11, layer="head-classifier"), "-rank0of1"))


def test_an_entry_larger_than_the_limit_is_refused_in_one_line_and_nothing_is_written(tmp_path):
    kept = save_entry(tmp_path, description(0), stats(10))
    with pytest.raises(CacheSpaceError) as refused:
        save_entry(tmp_path, description(1), stats(10_000), max_bytes=5000)
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith("a cache entry of 4") and " kB is larger than the cache's limit of 5.0 kB " in message
    assert "(--cache_max_gb 5e-06): raise --cache_max_gb" in message
    # 100 samples x (50 float32 inputs + an int64 label), and 4 kB for the label file's header and the .json
    with pytest.raises(CacheSpaceError, match=r"^a cache entry of 24\.9 kB .* limit of 5\.0 kB \(--cache_max_gb 5e-06\)"):
        feature_set(tmp_path, 2, samples=100, features=50, max_bytes=5000)
    assert sorted(tmp_path.iterdir()) == [kept]  # nor was the old entry evicted for it


def test_the_free_space_check_names_the_need_the_free_space_and_cache_dir(tmp_path, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(cache.shutil, "disk_usage", lambda path: usage._replace(free=5 * cache.GB))
    monkeypatch.setattr(cache, "RESERVE_BYTES", cache.GB)
    cache.check_free_space(tmp_path, 4 * cache.GB)  # leaves exactly the reserve
    with pytest.raises(CacheSpaceError) as refused:
        cache.check_free_space(tmp_path / "new", int(4.5 * cache.GB))
    assert str(refused.value) == (f"writing 4.5 GB to {tmp_path / 'new'} needs 5.5 GB free (1.0 GB kept spare) but "
                                  "the disk has 5.0 GB free: free some space or point --cache_dir at a larger disk")


def test_the_real_free_space_under_a_raised_reserve_refuses_before_writing(tmp_path, monkeypatch):
    monkeypatch.setattr(cache, "RESERVE_BYTES", shutil.disk_usage(tmp_path).free + 10 ** 12)  # more than the disk has
    folder = tmp_path / "cache"
    for write in (lambda: save_entry(folder, description(0), stats()), lambda: feature_set(folder, 1)):
        with pytest.raises(CacheSpaceError, match=r"^writing .* needs .* free \(.* kept spare\) but the disk has "
                                                  r".* free: free some space or point --cache_dir at a larger disk$"):
            write()
    assert not folder.exists()


def test_byte_counters(tmp_path):
    path = save_entry(tmp_path, description(0), stats())
    assert cache.counts.as_dict() == {"read": 0, "written": path.stat().st_size, "evicted": 0}
    cache.counts.reset()
    load_entry(tmp_path, description(0))
    assert cache.counts.as_dict() == {"read": path.stat().st_size, "written": 0, "evicted": 0}
    cache.counts.reset()
    features = feature_set(tmp_path, 1, samples=20, features=50)
    files = [features.path.with_suffix(s) for s in (".f32", ".labels.npy", ".json")]
    assert cache.counts.written == sum(f.stat().st_size for f in files)
    cache.counts.reset()
    assert sum(len(x) for x, _ in features.batches(batch_size=7)) == 20
    assert cache.counts.read == 20 * 50 * 4 + 20 * 8  # the inputs and the int64 labels


def test_list_prune_and_clear_touch_only_the_cache_s_own_files(tmp_path, capsys):
    old = save_entry(tmp_path, description(0, split="val", layer="classifier.1,classifier.4"), stats())
    eval_entry = save_entry(tmp_path, description(1, split="test", layer=None), stats(10))
    features = feature_set(tmp_path, 2)
    foreign = [tmp_path / "notes.txt", tmp_path / "train-mine.pt"]
    for path in foreign:
        path.write_text("not the cache's")
    age(old, 3 * 3600)
    age(eval_entry, 120)

    assert main(["list", "--cache_dir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4
    assert "features" in lines[0] and "train" in lines[0] and "head-classifier (rank0of1)" in lines[0]
    assert description(2)["weights"][:12] in lines[0]
    assert "2 min" in lines[1] and "stats" in lines[1] and "test" in lines[1] and "eval" in lines[1]
    assert "3 h" in lines[2] and "val" in lines[2] and "classifier.1,classifier.4" in lines[2]
    assert description(0)["weights"][:12] in lines[2]
    total = sum(e.bytes for e in cache.entries(tmp_path))
    assert lines[3].split()[:3] == cache._size(total).split() + ["total,"] and "3 entries" in lines[3]

    with pytest.raises(SystemExit):
        main(["prune", "--cache_dir", str(tmp_path)])  # --max_gb is needed
    newest = sum(f.stat().st_size for f in tmp_path.glob(features.path.name + ".*"))
    assert main(["prune", "--cache_dir", str(tmp_path), "--max_gb", str(newest / cache.GB)]) == 0
    assert "evicted 2 entries" in capsys.readouterr().out
    assert not old.exists() and not eval_entry.exists() and BlockFeatures.exists(features.path)

    assert main(["clear", "--cache_dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.startswith("deleted 1 entries")
    assert sorted(tmp_path.iterdir()) == sorted(foreign)


def test_a_write_in_progress_counts_but_is_evicted_only_once_stale(tmp_path):
    """Another process's half-written file (``.tmp``) is never deleted under it; the leftover of
    an interrupted write (untouched for ``STALE_SECONDS``) is."""
    size = save_entry(tmp_path, description(0), stats()).stat().st_size
    live = tmp_path / f"{entry_path(tmp_path, description(1)).name}.tmp"  # as save_entry names it
    leftover = tmp_path / f"{entry_path(tmp_path, description(2), '-rank0of1').name}.f32.tmp"  # as FeatureWriter
    for path in (live, leftover):
        path.write_bytes(bytes(size))
    age(leftover, cache.STALE_SECONDS + 60)
    age(tmp_path / entry_path(tmp_path, description(0)).name, 30)
    assert [e.kind for e in cache.entries(tmp_path)] == ["partial", "stats", "partial"]
    save_entry(tmp_path, description(3), stats(), max_bytes=int(3.5 * size))  # 4 x size: one must go
    assert not leftover.exists() and live.exists()
    save_entry(tmp_path, description(4), stats(), max_bytes=int(3.5 * size))
    assert live.exists() and not entry_path(tmp_path, description(0)).exists()
