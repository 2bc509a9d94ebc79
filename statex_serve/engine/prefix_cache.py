"""The recurrent-state prefix cache: the state after a token prefix, kept so a
later request that starts with the same tokens prefills only the rest.

What is stored and when (segment ends, branch and pin points), keys and lookup,
the two tiers and their budgets, readiness, scopes and which thread does what:
docs/prefix-cache.md ("Design", "Scopes").
"""
from __future__ import annotations

import collections
import hashlib
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from model_registry.state import StatePools
from statex_serve.engine.base import InvalidRequestError, PrefixInfo, PrefixNotFoundError

DEVICE, HOST = "device", "host"
ID_PREFIX = "pfx-"
# A branch point is cut only this far into a prompt at least (short shared runs
# are common by chance and not worth a segment and a snapshot of their own).
MIN_BRANCH_TOKENS = 16
# How many recently stored prompts a new prompt is compared with for a branch point.
RECENT_SOURCES = 16
# Stored prefixes are grouped by their first HEAD_TOKENS tokens, so a lookup
# only hashes the lengths of prefixes that start like its prompt.
HEAD_TOKENS = 64
_SHORT = b"short"          # the group of prefixes shorter than HEAD_TOKENS


def as_token_array(tokens) -> np.ndarray:
    return np.ascontiguousarray(tokens, dtype=np.int32)


def scope_bytes(owner: str | None, salt: str | None) -> bytes:
    """What a scope adds to every key it hashes (nothing for the unscoped one)."""
    if owner is None and salt is None:
        return b""
    parts = [("" if x is None else "1" + x).encode("utf-8", "surrogatepass") for x in (owner, salt)]
    return hashlib.blake2b(b"\0".join(parts), digest_size=16, person=b"statex-scope").digest()


class PrefixHasher:
    """Keys of one token sequence's prefixes, left to right: ``key(n)`` is the
    BLAKE2b digest of the scope and the first ``n`` tokens (as int32), and
    asking for many increasing ``n`` costs one pass over the tokens."""

    def __init__(self, tokens: np.ndarray, scope: bytes = b""):
        self._bytes = memoryview(tokens).cast("B")
        self._h = hashlib.blake2b(digest_size=16)
        if scope:
            self._h.update(scope)
        self._pos = 0

    def key(self, n: int) -> bytes:
        if n < self._pos:
            raise ValueError(f"prefix keys go left to right: asked for {n} after {self._pos}")
        self._h.update(self._bytes[4 * self._pos:4 * n])
        self._pos = n
        return self._h.digest()


def prefix_key(tokens, scope: bytes = b"") -> bytes:
    arr = as_token_array(tokens)
    return PrefixHasher(arr, scope).key(len(arr))


def prefix_id(key: bytes) -> str:
    return ID_PREFIX + key.hex()


def head_group(tokens: np.ndarray, n: int, scope: bytes = b"") -> bytes:
    """The group a prefix of ``n`` tokens of ``tokens`` is indexed under."""
    return prefix_key(tokens[:HEAD_TOKENS], scope) if n >= HEAD_TOKENS else _SHORT + scope


@dataclass(eq=False)
class CacheEntry:
    key: bytes
    num_tokens: int
    tokens: np.ndarray                 # the sequence it was cut from; [:num_tokens] is this prefix
    state: list[dict[str, torch.Tensor]]
    tier: str                          # DEVICE or HOST
    ready: torch.cuda.Event | None = None   # None: the copy is complete
    pinned: bool = False
    refs: int = 0                      # requests that will restore from it
    indexed: bool = True               # False once dropped or deleted (freed when refs reach 0)
    created: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)
    hits: int = 0
    group: bytes = b""                 # its head group (the lookup index)
    host_slot: int | None = None       # its slot in the pinned host pool (host tier on a GPU)
    owner: str | None = None           # the API key namespace it was stored for (pinned prefixes' visibility)

    @property
    def id(self) -> str:
        return prefix_id(self.key)

    def is_ready(self) -> bool:
        return self.ready is None or self.ready.query()

    def prefix_tokens(self) -> list[int]:
        return self.tokens[:self.num_tokens].tolist()

    def info(self, nbytes: int) -> PrefixInfo:
        return PrefixInfo(id=self.id, num_tokens=self.num_tokens, bytes=nbytes, location=self.tier,
                          pinned=self.pinned, created=self.created, last_used=self.last_used, hits=self.hits)


@dataclass
class CacheStats:
    hits: int = 0                  # lookups that restored a stored prefix
    misses: int = 0                # lookups that found none
    tokens_saved: int = 0          # prompt tokens not prefilled thanks to hits
    stores: int = 0                # snapshots written
    store_skipped: int = 0         # snapshots not stored: no room (budgets full of pinned or in-use entries)
    evictions: int = 0             # snapshots dropped to make room
    spills: int = 0                # snapshots moved from the device to host memory


class PrefixCache:
    """Snapshots of ``pools`` slots keyed by token prefix (docs/prefix-cache.md)."""

    def __init__(self, pools: StatePools, device: torch.device, device_budget: int, host_budget: int,
                 host_pool: bool | None = None):
        if device_budget < 0 or host_budget < 0:
            raise ValueError("prefix-cache budgets must be at least 0")
        self.pools = pools
        self.device = torch.device(device)
        self.entry_bytes = pools.spec.bytes_per_sequence
        self.budget = {DEVICE: int(device_budget), HOST: int(host_budget)}
        self.used = {DEVICE: 0, HOST: 0}
        self.counts = CacheStats()
        self._entries: dict[bytes, CacheEntry] = {}
        # per tier, least recently used first
        self._lru: dict[str, collections.OrderedDict[bytes, CacheEntry]] = {
            DEVICE: collections.OrderedDict(), HOST: collections.OrderedDict()}
        # head group -> number of indexed entries of each length
        self._lengths: dict[bytes, collections.Counter[int]] = collections.defaultdict(collections.Counter)
        self._pinned: dict[str, CacheEntry] = {}
        self._pins_reserved = 0
        self._zombies: set[CacheEntry] = set()       # dropped while a request still needs them
        # recently stored prompts (branch points are cut against those of the same scope)
        self._recent: collections.OrderedDict[int, tuple[bytes, np.ndarray]] = collections.OrderedDict()
        # Guards the index, the pins and the byte counts. The engine thread stores,
        # looks up, restores and moves snapshots; the API's threads only resolve
        # pinned ids, list and delete (``refs`` keeps an entry a queued request will
        # restore from alive through a delete).
        self._lock = threading.RLock()
        # The host tier of a GPU cache is one pinned pool allocated here, a slot per
        # snapshot: allocating pinned memory per spill (cudaHostAlloc) stalled the
        # engine for tens of ms per snapshot, which made a burst of 64 1K-token
        # prompts on an H200 reach its first tokens 3x later than with no cache.
        self._host_pool: list[dict[str, torch.Tensor]] = []
        self._host_free: list[int] = []
        if (self.device.type == "cuda" if host_pool is None else host_pool) and self._slots(HOST) > 0:
            n, pin = self._slots(HOST), self.device.type == "cuda"
            self._host_pool = [{k: torch.empty((n, *t.shape[1:]), dtype=t.dtype, pin_memory=pin)
                                for k, t in layer.items()} for layer in pools.pools]
            self._host_free = list(range(n - 1, -1, -1))

    # --- capacity ----------------------------------------------------------------------
    def _slots(self, tier: str) -> int:
        return self.budget[tier] // self.entry_bytes

    @property
    def capacity(self) -> int:
        """Snapshots the two tiers hold together."""
        return self._slots(DEVICE) + self._slots(HOST)

    def reserve_pin(self) -> None:
        """Hold room for one more pinned snapshot (at request arrival, so a pin
        that cannot be kept is refused before anything runs). Raises ``InvalidRequestError``."""
        with self._lock:
            if len(self._pinned) + self._pins_reserved + 1 > self.capacity:
                raise InvalidRequestError(
                    f"cannot pin another prefix: {len(self._pinned)} pinned prefixes (and {self._pins_reserved} "
                    f"being pinned) fill the prefix cache, which holds {self.capacity} snapshots of "
                    f"{self.entry_bytes} bytes (--prefix-cache-memory {self.budget[DEVICE]} + "
                    f"--prefix-cache-host-memory {self.budget[HOST]} bytes); delete some with "
                    "DELETE /v1/prefixes/{id}", "pin_prefix", "prefix_store_full")
            self._pins_reserved += 1

    def unreserve_pin(self) -> None:
        with self._lock:
            self._pins_reserved = max(0, self._pins_reserved - 1)

    # --- placing and dropping (lock held) ---------------------------------------------------
    def _drop(self, e: CacheEntry) -> None:
        """Out of the index; its bytes are freed now, or when the last reference goes."""
        if e.indexed:
            e.indexed = False
            del self._entries[e.key]
            del self._lru[e.tier][e.key]
            lengths = self._lengths[e.group]
            lengths[e.num_tokens] -= 1
            if not lengths[e.num_tokens]:
                del lengths[e.num_tokens]
                if not lengths:
                    del self._lengths[e.group]
        if e.refs > 0:
            self._zombies.add(e)
        elif e.state is not None:
            self._zombies.discard(e)
            self.used[e.tier] -= self.entry_bytes
            e.state = None
            if e.host_slot is not None:
                self._host_free.append(e.host_slot)
                e.host_slot = None

    def _make_room(self, tier: str) -> bool:
        """Free ``entry_bytes`` in ``tier``: device entries spill to host (or are
        dropped), host entries are dropped, least recently used first; pinned
        and referenced entries are never dropped."""
        if self.budget[tier] < self.entry_bytes:
            return False
        while self.used[tier] + self.entry_bytes > self.budget[tier]:
            in_tier = self._lru[tier]
            if tier == DEVICE and in_tier and self._make_room(HOST):
                self._spill(next(iter(in_tier.values())))
                continue
            victim = next((e for e in in_tier.values() if not e.pinned and e.refs == 0), None)
            if victim is None:
                return False
            self._drop(victim)
            self.counts.evictions += 1
        return True

    def _to_host_slot(self, state: list[dict[str, torch.Tensor]]) -> tuple[list[dict[str, torch.Tensor]], int]:
        """Queue copies of ``state`` into a free slot of the pinned host pool (the
        byte budget guarantees one is free); the views and the slot."""
        i = self._host_free.pop()
        out = []
        for layer, pool in zip(state, self._host_pool):
            views = {k: pool[k][i] for k in layer}
            for k, t in layer.items():
                views[k].copy_(t, non_blocking=True)
            out.append(views)
        return out, i

    def _spill(self, e: CacheEntry) -> None:
        if self._host_pool:                # on CPU without a pool the device is host memory: a relabel
            e.state, e.host_slot = self._to_host_slot(e.state)
            e.ready = _copy_done(self.device)    # unready again until the copy to host lands
        self.used[DEVICE] -= self.entry_bytes
        self.used[HOST] += self.entry_bytes
        del self._lru[DEVICE][e.key]
        self._lru[HOST][e.key] = e          # the most recently used of the host tier
        e.tier = HOST
        self.counts.spills += 1

    def _place(self) -> str | None:
        for tier in (DEVICE, HOST):
            if self._make_room(tier):
                return tier
        return None

    # --- the engine thread ------------------------------------------------------------------
    def store(self, key: bytes, num_tokens: int, tokens: np.ndarray, slot: int, pin: bool = False,
              scope: bytes = b"", owner: str | None = None) -> CacheEntry | None:
        """Snapshot ``slot`` (the state after ``tokens[:num_tokens]``) unless that
        prefix is stored already; ``pin`` pins it and uses up one reservation.
        Returns the entry, or None when there is no room."""
        with self._lock:
            if pin:
                self._pins_reserved = max(0, self._pins_reserved - 1)
            e = self._entries.get(key)
            if e is not None:
                self._touch(e)
                if pin:
                    self._pin(e)
                return e
            tier = self._place()
            if tier is None:
                self.counts.store_skipped += 1
                return None
            host_slot = None
            if tier == DEVICE:
                state = self.pools.snapshot(slot)
            elif self._host_pool:
                state, host_slot = self._to_host_slot([{k: t[slot] for k, t in layer.items()}
                                                       for layer in self.pools.pools])
            else:
                state = [{k: _to_host(t[slot]) for k, t in layer.items()} for layer in self.pools.pools]
            e = CacheEntry(key, num_tokens, tokens, state, tier, ready=_copy_done(self.device),
                           group=head_group(tokens, num_tokens, scope), owner=owner, host_slot=host_slot)
            self.used[tier] += self.entry_bytes
            self._entries[key] = e
            self._lru[tier][key] = e
            self._lengths[e.group][num_tokens] += 1
            self.counts.stores += 1
            self._recent[id(tokens)] = (scope, tokens)
            self._recent.move_to_end(id(tokens))
            while len(self._recent) > RECENT_SOURCES:
                self._recent.popitem(last=False)
            if pin:
                self._pin(e)
            return e

    def _touch(self, e: CacheEntry) -> None:
        e.last_used = time.time()
        if e.indexed:
            self._lru[e.tier].move_to_end(e.key)

    def _pin(self, e: CacheEntry) -> None:
        e.pinned = True
        self._pinned[e.id] = e

    def pin(self, e: CacheEntry) -> None:
        """Pin an entry the engine already holds (a request whose pinned prefix
        was stored already); uses up one reservation."""
        with self._lock:
            self._pins_reserved = max(0, self._pins_reserved - 1)
            self._pin(e)

    def lookup(self, tokens: np.ndarray, limit: int, floor: CacheEntry | None = None, scope: bytes = b""
               ) -> CacheEntry | None:
        """The longest stored, ready prefix of ``tokens`` with at most ``limit``
        tokens (longer than ``floor``'s, else ``floor`` itself: a pinned prefix
        the request starts from). The caller holds a reference on the result
        until it has restored it (``release``). Counts a hit or a miss."""
        at_least = floor.num_tokens if floor is not None else 0
        groups = [_SHORT + scope] + ([head_group(tokens, limit, scope)] if limit >= HEAD_TOKENS else [])
        with self._lock:
            lengths = sorted(n for g in groups for n in self._lengths.get(g, ()) if at_least < n <= limit)
        keys = []
        if lengths:                            # one pass over the tokens, outside the lock
            hasher = PrefixHasher(tokens, scope)
            keys = [(n, hasher.key(n)) for n in lengths]
        with self._lock:
            found = None
            for n, key in reversed(keys):
                e = self._entries.get(key)
                if e is not None and e.num_tokens == n and e.is_ready():
                    found = e
                    break
            if found is None and floor is not None:
                found = floor
            if found is None:
                self.counts.misses += 1
                return None
            found.refs += 1
            found.hits += 1
            self._touch(found)
            self.counts.hits += 1
            self.counts.tokens_saved += found.num_tokens
            return found

    def branch_point(self, tokens: np.ndarray, start: int, limit: int, scope: bytes = b"") -> int | None:
        """Where ``tokens`` parts from the recently stored prompt of its scope it
        shares most with (at most ``limit``), when that is past ``start`` and at
        least ``MIN_BRANCH_TOKENS`` in. (Other scopes' prompts are never looked
        at: a cut there would be stored, and its hit would reveal their length.)"""
        with self._lock:
            sources = [src for sc, src in self._recent.values() if sc == scope]
        best = 0
        for src in sources:
            n = min(len(src), len(tokens), limit)
            if n <= max(best, start) or src[start] != tokens[start]:
                continue
            differ = np.flatnonzero(src[:n] != tokens[:n])
            best = max(best, int(differ[0]) if len(differ) else n)
        return best if best > start and best >= MIN_BRANCH_TOKENS else None

    def restore(self, e: CacheEntry, slot: int) -> None:
        """Copy a snapshot into ``slot`` (the caller holds a reference, so it is
        neither dropped nor moved meanwhile: only the engine thread moves entries)."""
        if e.ready is not None:
            e.ready.synchronize()           # never read a snapshot that is still being written
        self.pools.restore_(slot, e.state)

    def release(self, e: CacheEntry) -> None:
        with self._lock:
            e.refs -= 1
            if e.refs == 0 and not e.indexed:
                self._drop(e)

    # --- any thread: pinned prefixes ---------------------------------------------------------
    def _pinned_of(self, pid: str, owner: str | None) -> CacheEntry:
        """The pinned entry ``pid`` of namespace ``owner`` (lock held); another
        namespace's pin is as unknown as a never-pinned id."""
        e = self._pinned.get(pid)
        if e is None or e.owner != owner:
            raise PrefixNotFoundError(_not_found(pid))
        return e

    def acquire_pinned(self, pid: str, owner: str | None = None) -> CacheEntry:
        """A pinned entry a new request will start from (released after restore)."""
        with self._lock:
            e = self._pinned_of(pid, owner)
            e.refs += 1
            return e

    def info(self, pid: str, owner: str | None = None) -> PrefixInfo:
        with self._lock:
            return self._pinned_of(pid, owner).info(self.entry_bytes)

    def list_pinned(self, owner: str | None = None) -> list[PrefixInfo]:
        with self._lock:
            return sorted((e.info(self.entry_bytes) for e in self._pinned.values() if e.owner == owner),
                          key=lambda i: i.created)

    def delete(self, pid: str, owner: str | None = None) -> PrefixInfo:
        """Unpin and drop (its bytes are freed once no queued request needs them)."""
        with self._lock:
            e = self._pinned_of(pid, owner)
            del self._pinned[pid]
            info = e.info(self.entry_bytes)
            e.pinned = False
            self._drop(e)
            return info

    def stats(self) -> dict:
        with self._lock:
            by_tier = {tier: len(lru) for tier, lru in self._lru.items()}
            return {**self.counts.__dict__,
                    "bytes_device": self.used[DEVICE], "bytes_host": self.used[HOST],
                    "budget_device": self.budget[DEVICE], "budget_host": self.budget[HOST],
                    "entries_device": by_tier[DEVICE], "entries_host": by_tier[HOST],
                    "pinned": len(self._pinned), "entry_bytes": self.entry_bytes}

    def check_invariants(self) -> None:
        """Byte counts equal the snapshots held and stay within the budgets (tests call this)."""
        with self._lock:
            held = [*self._entries.values(), *self._zombies]
            for tier in (DEVICE, HOST):
                nbytes = sum(self.entry_bytes for e in held if e.tier == tier and e.state is not None)
                assert self.used[tier] == nbytes, (tier, self.used[tier], nbytes)
                assert self.used[tier] <= self.budget[tier], (tier, self.used[tier], self.budget[tier])
            assert all(e.indexed for e in self._entries.values())
            assert sum(len(lru) for lru in self._lru.values()) == len(self._entries)
            assert all(e.key in self._lru[e.tier] for e in self._entries.values())
            assert sum(sum(c.values()) for c in self._lengths.values()) == len(self._entries)
            if self._host_pool:
                held_slots = [e.host_slot for e in held if e.host_slot is not None]
                assert len(set(held_slots)) == len(held_slots) and not set(held_slots) & set(self._host_free)
                assert len(held_slots) + len(self._host_free) == self._slots(HOST)


def _not_found(pid: str) -> str:
    return (f"No pinned prefix with id {pid!r}: it was never pinned here, was deleted, or the server restarted "
            "(GET /v1/prefixes lists the pinned prefixes)")


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """A host copy, for a host tier without a pinned pool (CPU caches; a GPU cache
    uses its pool, ``PrefixCache._to_host_slot``)."""
    return t.to("cpu", copy=True)


def _copy_done(device: torch.device) -> torch.cuda.Event | None:
    """An event that fires when the copies queued so far on ``device`` are done (None on CPU)."""
    if device.type != "cuda":
        return None
    ev = torch.cuda.Event()
    ev.record(torch.cuda.current_stream(device))
    return ev
