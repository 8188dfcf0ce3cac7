"""RedisKVTier: the Redis adapter of the shared prefix cache. Bytes and numpy only, no torch.

Keys are `<prefix>:<namespace>:<block hash hex>`; the namespace is the model digest, so two
model versions never read each other's blocks. Values are codec entries (header + payload).

Threads: the caller (the engine thread) never talks to Redis itself.
  - lookups and fetches run on one I/O thread; the caller waits at most lookup_timeout_ms /
    load_timeout_ms for them, and a timed-out call is simply a miss;
  - publishing is a bounded queue drained by a publisher thread into pipelined SETs; when the
    queue is full the block is dropped (counted), so a decode step never waits. The publisher
    runs at SCHED_BATCH, so it never preempts the engine's threads when it wakes.
Faults: any Redis error marks the tier unavailable (counted, logged once); while unavailable
lookups are instant misses and publishes are skipped, and a ping on the I/O thread retries
with exponential backoff. The URL is re-read on every reconnect (an embedded server may have
been restarted on another port).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from serve_app.kvstore.codec import CodecError, KVLayout, decode_block, encode_block
from serve_app.kvstore.settings import KVStoreConfig
from serve_app.kvstore.stats import KVStoreStats, LatencyHistogram
from serve_app.platform import sched
from serve_app.platform.device import name_os_thread

log = logging.getLogger(__name__)

BACKOFF_START_S = 0.1
BACKOFF_MAX_S = 2.0
CONNECT_TIMEOUT_S = 0.5
PUBLISH_SOCKET_TIMEOUT_S = 5.0
MAX_PUBLISH_BATCH = 64  # blocks per pipelined round trip
# OS names of the tier's threads (15 bytes at most): created by the engine thread, they would
# otherwise inherit its name and count as engine CPU in `moeserve bench serve`'s split
PUBLISH_THREAD = "moeserve-kv-pub"
IO_THREAD = "moeserve-kv-io"


class RedisKVTier:
    def __init__(
        self,
        url_provider: Callable[[], str],
        namespace: str,
        layout: KVLayout,
        config: KVStoreConfig,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.layout = layout
        self.config = config
        self._url_provider = url_provider
        self._key_prefix = f"{config.key_prefix}:{namespace}:"
        self._clock = clock
        self._lock = threading.Lock()
        self._url: str | None = None
        self._io_client: redis.Redis | None = None
        self._pub_client: redis.Redis | None = None
        self._up = False
        self._last_error: str | None = None
        self._retry_at = 0.0
        self._backoff = BACKOFF_START_S
        self._inflight: Future | None = None  # the I/O thread's current job
        self._reconnecting: Future | None = None
        self._c = dict.fromkeys(
            (
                "blocks_published bytes_published publish_drops publish_errors lookups "
                "lookup_timeouts blocks_fetched bytes_fetched fetch_failures corrupt_entries "
                "degradation_events"
            ).split(),
            0,
        )
        self._latency = LatencyHistogram()
        self._io = ThreadPoolExecutor(
            1, thread_name_prefix=IO_THREAD, initializer=name_os_thread, initargs=(IO_THREAD,)
        )
        self._queue: queue.Queue = queue.Queue(config.publish_queue_size)
        self._stopping = threading.Event()
        self._publisher = threading.Thread(
            target=self._publish_loop, name=PUBLISH_THREAD, daemon=True
        )
        self._publisher.start()
        # Start-up is not a step: wait (briefly) for the first connection.
        try:
            self._io.submit(self._connect, True).result(timeout=CONNECT_TIMEOUT_S * 4)
        except FutureTimeout:
            self._fail(TimeoutError("connect timed out"), "start")

    # ---- engine-thread API (never blocks past the configured timeouts) ----------------------

    @property
    def connected(self) -> bool:
        return self._up

    def lookup(self, hashes: Sequence[bytes]) -> int:
        """How many of `hashes`, from the first, are present (one pipelined EXISTS round trip)."""
        if not hashes or not self._ready():
            return 0
        keys = [self.key(h) for h in hashes]
        t0 = self._clock()
        job = self._inflight = self._io.submit(self._exists, keys)
        try:
            present = job.result(timeout=self.config.lookup_timeout_ms / 1000)
        except FutureTimeout:
            self._count("lookup_timeouts")
            return 0
        except Exception as e:  # noqa: BLE001 - any failure of the store is a miss
            self._fail(e, "lookup")
            return 0
        finally:
            with self._lock:
                self._c["lookups"] += 1
                self._latency.observe((self._clock() - t0) * 1000)
        n = 0
        while n < len(present) and present[n]:
            n += 1
        return n

    def fetch(self, hashes: Sequence[bytes]) -> list[np.ndarray]:
        """Fetch and validate blocks; returns the arrays of the leading run that decoded.

        A missing, corrupt or mismatched entry ends the run (corrupt ones are deleted)."""
        if not hashes or not self._ready():
            return []
        job = self._inflight = self._io.submit(self._get_decode, list(hashes))
        try:
            return job.result(timeout=self.config.load_timeout_ms / 1000)
        except FutureTimeout:
            self._count("fetch_failures")
            return []
        except Exception as e:  # noqa: BLE001
            self._count("fetch_failures")
            self._fail(e, "fetch")
            return []

    def publish_room(self, n: int) -> int:
        """How many of n new blocks to copy out; the rest are counted as dropped (or errors
        while Redis is unavailable). Only the engine thread enqueues, so the room holds."""
        if not self._up:
            self._maybe_reconnect()  # called every step: this is what drives reconnection
            if n > 0:
                self._count("publish_errors", n)
            return 0
        if n <= 0:
            return 0
        room = max(self.config.publish_queue_size - self._queue.qsize(), 0)
        if room < n:
            self._count("publish_drops", n - room)
        return min(room, n)

    def publish(self, items: Sequence[tuple[bytes, np.ndarray]]) -> None:
        """Queue (block hash, [L, 2, B, H, D] array) pairs; never blocks."""
        for item in items:
            try:
                self._queue.put_nowait(item)
            except queue.Full:
                self._count("publish_drops")

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until every queued block is sent (tests, benchmarks, shutdown)."""
        deadline = time.monotonic() + timeout_s
        while self._queue.unfinished_tasks:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.002)
        return True

    def key(self, block_hash: bytes) -> str:
        return self._key_prefix + block_hash.hex()

    def stats(self) -> KVStoreStats:
        with self._lock:
            return KVStoreStats(
                connected=self._up,
                lookup_latency=self._latency.snapshot(),
                url=_redact(self._url) if self._url else None,
                last_error=None if self._up else self._last_error,
                **self._c,
            )

    def close(self) -> None:
        self._stopping.set()
        self._publisher.join(timeout=5)
        self._io.shutdown(wait=False, cancel_futures=True)
        for client in (self._io_client, self._pub_client):
            if client is not None:
                client.close()

    # ---- state ------------------------------------------------------------------------------

    def _ready(self) -> bool:
        if not self._up:
            self._maybe_reconnect()
            return False
        # A slow job still holds the I/O thread: don't queue behind it.
        return self._inflight is None or self._inflight.done()

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._c[name] += n

    def _fail(self, error: BaseException, where: str) -> None:
        with self._lock:
            was_up = self._up
            self._up = False
            self._last_error = f"{where}: {type(error).__name__}: {error}"
            self._retry_at = self._clock() + self._backoff
            delay, self._backoff = self._backoff, min(self._backoff * 2, BACKOFF_MAX_S)
            if was_up or where == "start":
                self._c["degradation_events"] += 1
        if was_up or where == "start":
            log.warning(
                "shared KV cache: redis unavailable during %s (%s: %s); serving from local "
                "compute, retrying in %.1fs with backoff",
                where,
                type(error).__name__,
                error,
                delay,
            )

    def _maybe_reconnect(self) -> None:
        if self._clock() < self._retry_at or (
            self._reconnecting is not None and not self._reconnecting.done()
        ):
            return
        if self._stopping.is_set():
            return
        try:
            self._reconnecting = self._io.submit(self._connect)
        except RuntimeError:  # executor shut down
            pass

    # ---- the I/O thread ---------------------------------------------------------------------

    def _connect(self, initial: bool = False) -> None:
        try:
            url = self._url_provider()
            if url != self._url or self._io_client is None:
                self._url = url
                self._io_client = _client(url, max(self.config.load_timeout_ms / 500, 1.0))
                self._pub_client = _client(url, PUBLISH_SOCKET_TIMEOUT_S)
            self._io_client.connection_pool.disconnect()  # drop sockets of a dead server
            self._io_client.ping()
        except Exception as e:  # noqa: BLE001
            self._fail(e, "start" if initial else "reconnect")
            return
        with self._lock:
            was_up, self._up, self._backoff = self._up, True, BACKOFF_START_S
        if not was_up:
            log.info("shared KV cache: connected to %s", _redact(url))

    def _exists(self, keys: list[str]) -> list[bool]:
        pipe = self._io_client.pipeline(transaction=False)
        for k in keys:
            pipe.exists(k)
        return [bool(x) for x in pipe.execute()]

    def _get_decode(self, hashes: list[bytes]) -> list[np.ndarray]:
        pipe = self._io_client.pipeline(transaction=False)
        ttl = self.config.ttl_s
        for h in hashes:
            # GET refreshes the entry's LRU clock; with a TTL, GETEX also renews the TTL.
            if ttl:
                pipe.getex(self.key(h), ex=ttl)
            else:
                pipe.get(self.key(h))
        values = pipe.execute()
        out: list[np.ndarray] = []
        nbytes = 0
        for h, value in zip(hashes, values, strict=True):
            if value is None:
                break
            try:
                out.append(decode_block(value, h, self.layout, self.config.int8))
            except CodecError as e:
                log.warning("shared KV cache: dropping corrupt entry %s: %s", self.key(h), e)
                self._count("corrupt_entries")
                try:
                    self._io_client.delete(self.key(h))
                except redis.RedisError as de:
                    log.warning("shared KV cache: could not delete %s: %s", self.key(h), de)
                break
            nbytes += len(value)
        with self._lock:
            self._c["blocks_fetched"] += len(out)
            self._c["bytes_fetched"] += nbytes
        return out

    # ---- the publisher thread ---------------------------------------------------------------

    def _publish_loop(self) -> None:
        name_os_thread(PUBLISH_THREAD)
        # background work: never preempts the engine's threads (serve_app.platform.sched); the
        # I/O thread stays at its creator's policy, the engine waits for its lookups
        sched.set_thread("batch")
        while not self._stopping.is_set():
            try:
                batch = [self._queue.get(timeout=0.1)]
            except queue.Empty:
                continue
            while len(batch) < MAX_PUBLISH_BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                self._send(batch)
            finally:
                for _ in batch:
                    self._queue.task_done()

    def _send(self, batch: list[tuple[bytes, np.ndarray]]) -> None:
        client = self._pub_client
        if not self._up or client is None:
            self._count("publish_errors", len(batch))
            return
        nbytes = 0
        try:
            pipe = client.pipeline(transaction=False)
            for h, kv in batch:
                data = encode_block(h, kv, self.layout, self.config.int8)
                nbytes += len(data)
                pipe.set(self.key(h), data, ex=self.config.ttl_s)
            pipe.execute()
        except Exception as e:  # noqa: BLE001 - a lost publish only costs a future miss
            self._count("publish_errors", len(batch))
            self._fail(e, "publish")
            return
        with self._lock:
            self._c["blocks_published"] += len(batch)
            self._c["bytes_published"] += nbytes


def _client(url: str, socket_timeout_s: float) -> redis.Redis:
    # One immediate retry replaces a socket that died with a restarted server; no backoff
    # here, the tier owns the backoff.
    return redis.Redis.from_url(
        url,
        socket_timeout=socket_timeout_s,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        retry=Retry(NoBackoff(), 1),
        health_check_interval=0,
    )


def _redact(url: str) -> str:
    """The URL without its password, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=user + netloc))
