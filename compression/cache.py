"""On-disk cache of what passes over the data produce (layer statistics, loss, accuracy,
the head's inputs), keyed by everything that determines them, and kept within a size.

``describe`` fingerprints a pass: a SHA-256 over the weights that the pass reads, the layer
(or none), the data set class, root, split and exact sample indices, the eval transform
and the sample count. A stored entry carries that description in readable form; an entry
whose description differs from what is asked for, or that cannot be read, is recomputed,
never trusted. A second compression of the same checkpoint with another lambda therefore
starts at once. Entries are plain dicts of tensors and numbers (``torch.load`` with
``weights_only=True`` reads them); what they mean is the caller's business.

Size. Without a limit a cache only grows (2.8 GB after one demo compression, 23 GB after a
working day, 47 GB for one split of ImageNet's head inputs), until a run dies on a full disk.
So a folder can be given ``max_bytes`` (the command line's ``--cache_max_gb``): before an
entry is written, the least recently used entries are deleted until it fits (``reserve``),
and an entry larger than the whole limit is refused before anything is written. An entry is
a statistics file ``<split>-<layer>-<key>.pt`` or a feature set of ``compression.features``,
``<split>-head-<head>-<key>-rank<r>of<w>`` + ``.f32``, ``.labels.npy``, ``.json``; these
names are how the cache tells its own files from anything else in the folder, which it never
deletes. Recency is the newest modification time of an entry's files, set to now whenever the
entry is read or written (``touch``): it survives across processes, needs no index file that
concurrent writers (DDP ranks, two runs sharing a cache) would have to lock and keep in step
with the folder, and a file deleted by hand simply drops out of it. Access times are not used:
disks mounted ``relatime`` or ``noatime`` (the default) do not update them on every read.

Disk. Every write is checked first against the disk's free space (``check_free_space``): it
must leave ``RESERVE_BYTES`` free, and a write that would not stops at once with the need, the
free space and ``--cache_dir`` in one line, instead of failing hours later half-written.

``counts`` adds up the bytes this process read from and wrote to cache entries, for a run's
report. ``python -m compression.cache list | prune | clear`` shows and trims a cache folder.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from stat import S_ISREG
from typing import Any, Iterable, Optional, Sequence

import torch
from torch import nn

GB = 10 ** 9  # the unit of --cache_max_gb and --max_gb (bytes)
# Bytes that must stay free on a disk after a cache write: room for the run's checkpoints and
# logs, and for everything else on the machine. Read at each check (a test may raise it).
RESERVE_BYTES = GB
# A half-written file (``.tmp``) of another process is never evicted, unless nothing has
# touched it for this long (seconds): then it is the leftover of an interrupted write.
STALE_SECONDS = 3600.0


class CacheSpaceError(OSError):
    """A cache write refused before it starts: larger than the cache's limit, or than the
    disk's free space. The message is one line that says what to change."""


@dataclass
class ByteCounts:
    """Bytes this process read from and wrote to cache entries (statistics and head inputs,
    all folders), and deleted to keep a limit."""

    read: int = 0
    written: int = 0
    evicted: int = 0

    def reset(self) -> None:
        self.read = self.written = self.evicted = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


counts = ByteCounts()


def fingerprint(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """SHA-256 over named tensors (names and bytes)."""
    digest = hashlib.sha256()
    for name, tensor in tensors:
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def describe(network: nn.Module, layers: Sequence[str], datamodule: Any, split: str,
             skip_prefix: Optional[str] = None, limit: Optional[int] = None) -> dict[str, Any]:
    """What a pass of ``network`` over ``split`` ('train', 'val' or 'test') depends on, with the
    statistics of ``layers`` (module paths; none for an evaluation), over the split's first
    ``limit`` samples (None: all). Weights under ``skip_prefix`` (a module path) are left out:
    the pass does not read them."""
    skip = None if skip_prefix is None else (skip_prefix + "." if skip_prefix else "")
    weights = fingerprint((n, t) for n, t in network.state_dict().items() if skip is None or not n.startswith(skip))
    dataset = {"train": datamodule.train_eval_set, "val": datamodule.val_set, "test": datamodule.test_set}[split]
    indices = list(getattr(dataset, "indices", range(len(dataset))))[:limit]
    return {
        "weights": weights,
        "layer": ",".join(layers) or None,
        "dataset": type(datamodule).__name__,
        "root": str(Path(datamodule.hparams.root).resolve()),
        "split": split,
        "indices": hashlib.sha256(str(indices).encode()).hexdigest(),
        "transform": repr(datamodule.eval_transform),
        "samples": len(indices),
    }


def entry_path(cache_dir: str | Path, description: dict[str, Any], suffix: str = ".pt") -> Path:
    key = hashlib.sha256(repr(sorted(description.items())).encode()).hexdigest()[:24]
    layers = (description["layer"] or "eval").split(",")
    name = layers[0] + (f"+{len(layers) - 1}" if len(layers) > 1 else "")
    return Path(cache_dir) / f"{description['split']}-{name}-{key}{suffix}"


def load_entry(cache_dir: str | Path, description: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The stored entry for ``description`` if a valid file exists, else None. A hit becomes
    the most recently used entry."""
    path = entry_path(cache_dir, description)
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a truncated or foreign file: recompute
        return None
    if not isinstance(saved, dict) or saved.get("description") != description:
        return None
    counts.read += _file_bytes(path)
    touch([path])
    return saved["entry"]


def save_entry(cache_dir: str | Path, description: dict[str, Any], entry: dict[str, Any],
               max_bytes: Optional[int] = None) -> Path:
    """Store ``entry`` for ``description`` in ``cache_dir``, which holds at most ``max_bytes``
    (None: no limit): least recently used entries are evicted first. Raises ``CacheSpaceError``,
    before writing, for an entry larger than the limit or than the disk's free space."""
    path = entry_path(cache_dir, description)
    saved = {"description": description, "entry": entry}
    reserve(path.parent, _saved_bytes(saved), max_bytes, keep=path.stem)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")  # not with_suffix: a layer name such as "classifier.4" has a dot
    torch.save(saved, tmp)
    settle(path.parent, tmp.stat().st_size, max_bytes, keep=path.stem)  # reserved an estimate: the real size
    tmp.replace(path)  # atomic: an interrupted write never leaves a half file under the real name
    counts.written += _file_bytes(path)
    return path


def _saved_bytes(obj: Any) -> int:
    """About the bytes ``torch.save(obj)`` writes: every tensor storage once, plus the pickled
    rest and the zip records around them (measured: 1.3 kB, and 0.3 kB per tensor)."""
    storages: dict[int, int] = {}

    def skeleton(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            storages[value.untyped_storage().data_ptr()] = value.untyped_storage().nbytes()
            return None
        if isinstance(value, dict):
            return {k: skeleton(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [skeleton(v) for v in value]
        return value

    rest = len(pickle.dumps(skeleton(obj)))
    return sum(storages.values()) + 2 * rest + 2048 + 512 * len(storages)


# --- the folder's entries, recency and room -------------------------------------------------

_NAME = re.compile(r"(?P<stem>(?P<split>train|val|test)-(?P<layer>.+)-(?P<key>[0-9a-f]{24})(?P<shard>-rank\d+of\d+)?)"
                   r"(?P<suffix>\.pt|\.f32|\.labels\.npy|\.json)?(?P<tmp>\.tmp)?")


@dataclass
class Entry:
    """One entry as found on disk: a statistics file or a feature set's files; a write still in
    progress (or interrupted) is an entry of its own, ``partial``."""

    stem: str  # the name its files share, without suffixes
    files: list[Path]
    bytes: int
    last_used: float  # seconds since the epoch: the newest modification time of its files
    kind: str  # "stats", "features" or "partial"

    def evictable(self, now: float) -> bool:
        return self.kind != "partial" or now - self.last_used > STALE_SECONDS


def entries(cache_dir: str | Path) -> list[Entry]:
    """The entries in ``cache_dir``, least recently used first; files that this cache did not
    write are not entries."""
    folder = Path(cache_dir)
    groups: dict[tuple[str, str], list[tuple[Path, os.stat_result]]] = {}
    for path in (folder.iterdir() if folder.is_dir() else ()):
        match = _NAME.fullmatch(path.name)
        if match is None or not (match["suffix"] or match["tmp"]):
            continue
        try:
            stat = path.stat()
        except FileNotFoundError:  # deleted meanwhile by another process
            continue
        if S_ISREG(stat.st_mode):
            kind = "partial" if match["tmp"] else "features" if match["shard"] else "stats"
            groups.setdefault((match["stem"], kind), []).append((path, stat))
    found = [Entry(stem, [p for p, _ in files], sum(s.st_size for _, s in files), max(s.st_mtime for _, s in files),
                   kind) for (stem, kind), files in groups.items()]
    return sorted(found, key=lambda e: e.last_used)


def touch(paths: Iterable[Path]) -> None:
    """Make the entry of ``paths`` the most recently used (its files' modification time: now)."""
    for path in paths:
        try:
            os.utime(path)
        except OSError:  # gone, or another user's file in a shared cache: recency is a hint only
            pass


def evict(entry: Entry) -> None:
    """Delete ``entry``'s files."""
    for path in entry.files:
        path.unlink(missing_ok=True)  # another process may have evicted it first
    counts.evicted += entry.bytes


def _victims(cache_dir: str | Path, nbytes: int, max_bytes: int, keep: Optional[str]) -> list[Entry]:
    """The least recently used entries to evict so that the folder's entries and ``nbytes`` more
    fit in ``max_bytes``. ``keep``: the stem of the entry being written, which replaces its old
    files (so they do not count) and is never evicted. Other processes' writes in progress are
    counted but not evicted: with them the folder may pass the limit by their size."""
    present = [entry for entry in entries(cache_dir) if entry.stem != keep]
    used, now, chosen = sum(entry.bytes for entry in present) + nbytes, time.time(), []
    for entry in present:
        if used <= max_bytes:
            break
        if entry.evictable(now):
            chosen.append(entry)
            used -= entry.bytes
    return chosen


def check_free_space(directory: str | Path, nbytes: int, freed: int = 0) -> None:
    """Raise ``CacheSpaceError`` unless writing ``nbytes`` (bytes) into ``directory`` leaves
    ``RESERVE_BYTES`` free on its disk; ``freed``: bytes that evictions about to be made give
    back. The folder need not exist yet (its nearest existing parent is measured)."""
    folder = Path(directory)
    existing = next((p for p in (folder, *folder.absolute().parents) if p.is_dir()), Path("."))
    free = shutil.disk_usage(existing).free
    if free + freed < nbytes + RESERVE_BYTES:
        evicting = f" (+{_size(freed)} from evicting old entries)" if freed else ""
        raise CacheSpaceError(f"writing {_size(nbytes)} to {folder} needs {_size(nbytes + RESERVE_BYTES)} free "
                              f"({_size(RESERVE_BYTES)} kept spare) but the disk has {_size(free)} free{evicting}: "
                              "free some space or point --cache_dir at a larger disk")


def reserve(directory: str | Path, nbytes: int, max_bytes: Optional[int] = None, keep: Optional[str] = None) -> None:
    """Make room for an entry of ``nbytes`` (bytes) about to be written into the cache folder
    ``directory``: refuse one larger than ``max_bytes`` (None: no limit) or than the disk's free
    space, with ``CacheSpaceError`` and nothing deleted, else evict the least recently used
    entries until it fits in ``max_bytes``. ``keep``: see ``_victims``."""
    victims: list[Entry] = []
    if max_bytes is not None:
        if nbytes > max_bytes:
            raise CacheSpaceError(f"a cache entry of {_size(nbytes)} is larger than the cache's limit of "
                                  f"{_size(max_bytes)} (--cache_max_gb {max_bytes / GB:g}): raise --cache_max_gb "
                                  "or run without a cache")
        victims = _victims(directory, nbytes, max_bytes, keep)
    check_free_space(directory, nbytes, freed=sum(entry.bytes for entry in victims))
    for entry in victims:
        evict(entry)


def settle(directory: str | Path, nbytes: int, max_bytes: Optional[int], keep: str) -> None:
    """After the entry ``keep`` (a stem) is written, ``nbytes`` (bytes) in all, evict what its
    real size, if larger than reserved, still puts over ``max_bytes`` (None: nothing to do)."""
    if max_bytes is not None:
        for entry in _victims(directory, nbytes, max_bytes, keep):
            evict(entry)


def prune(cache_dir: str | Path, max_bytes: int) -> list[Entry]:
    """Evict least recently used entries until ``cache_dir`` holds at most ``max_bytes``; returns them."""
    victims = _victims(cache_dir, 0, max_bytes, None)
    for entry in victims:
        evict(entry)
    return victims


def _file_bytes(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _size(n: float) -> str:
    """Bytes for people: decimal units, as ``--cache_max_gb``."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def _age(seconds: float) -> str:
    for unit, scale in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= scale:
            return f"{seconds / scale:.0f} {unit}"
    return f"{seconds:.0f} s"


def _described(entry: Entry) -> Optional[dict[str, Any]]:
    """The description stored in ``entry`` (None if unreadable or absent), read without loading
    its tensors (``mmap``) and without making it recent."""
    try:
        if entry.kind == "stats":
            saved = torch.load(entry.files[0], map_location="cpu", weights_only=True, mmap=True)
            return saved.get("description") if isinstance(saved, dict) else None
        if entry.kind == "features":
            return json.loads(Path(entry.files[0].parent, entry.stem + ".json").read_text()).get("description")
    except Exception:  # truncated, foreign, or written before descriptions were stored
        return None
    return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``list``: each entry's size, time since last use, network fingerprint, layer(s), split, and
    the total; ``prune``: evict least recently used entries down to ``--max_gb``; ``clear``:
    delete every entry (files of other names in the folder are left alone)."""
    parser = argparse.ArgumentParser(prog="python -m compression.cache", description=main.__doc__)
    parser.add_argument("command", choices=("list", "prune", "clear"))
    parser.add_argument("--cache_dir", default=".cache/passes")
    parser.add_argument("--max_gb", type=float, default=None, help="prune: the size to keep the cache within (GB)")
    args = parser.parse_args(argv)
    found = entries(args.cache_dir)
    if args.command == "list":
        now = time.time()
        for entry in reversed(found):  # most recently used first
            description = _described(entry) or {}
            match = _NAME.fullmatch(entry.stem + ".json")
            weights = (description.get("weights") or "?")[:12]
            layer = description.get("layer") or ("eval" if description else match["layer"])
            shard = f" ({match['shard'][1:]})" if match["shard"] else ""
            print(f"{_size(entry.bytes):>9}  {_age(now - entry.last_used):>6}  {entry.kind:8}  {match['split']:5}  "
                  f"{weights:12}  {layer}{shard}")
        print(f"{_size(sum(e.bytes for e in found)):>9}  total, {len(found)} entries in {args.cache_dir}")
    elif args.command == "prune":
        if args.max_gb is None:
            parser.error("prune needs --max_gb")
        gone = prune(args.cache_dir, int(args.max_gb * GB))
        left = sum(entry.bytes for entry in entries(args.cache_dir))
        print(f"evicted {len(gone)} entries ({_size(sum(entry.bytes for entry in gone))}); "
              f"{_size(left)} left in {args.cache_dir}")
    else:
        for entry in found:
            evict(entry)
        print(f"deleted {len(found)} entries ({_size(sum(e.bytes for e in found))}) from {args.cache_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
