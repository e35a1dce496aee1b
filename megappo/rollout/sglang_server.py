"""``rollout.engine: sglang_server``: external SGLang servers reached by URL (disaggregated).

Supported: sglang >= 0.5.18, < 0.5.22 on the servers; the trainer side needs no SGLang,
only the standard library (``urllib``) and ``torch.distributed``.

Generation: every replica's engine spreads its prompts over all servers round-robin, one
``POST /generate`` per server in parallel threads, and puts the answers back in prompt
order. Every call has a timeout (``rollout.server_timeout_s``); a timeout, a refused
connection or an error status becomes a ``RolloutEngineError`` naming the server URL.

Weights: only the first data-parallel replica's engine sends (``receives_weights``); the
others share its servers. On its first sync it asks each server's ``tp_size``
(``/get_server_info``), then joins a process group with all servers' TP ranks
(``/init_weights_update_group``: trainer rank 0, server i's ranks from
``1 + sum of earlier tp_size``; NCCL with a GPU, gloo without) built the way SGLang builds
its side (``join_update_group``). Per bucket: ``POST /update_weights_from_distributed``
(names, dtypes, shapes, ``load_format=flattened_bucket``) to every server in threads while
the trainer broadcasts the bucket's bytes end to end (SGLang's ``FlattenedTensorBucket``
layout; the trainer holds the bucket and that flat copy, two buckets of memory). 0.5.21 servers need ``/begin_weight_update`` and ``/end_weight_update`` around
the loads; a 404 there means an older server that has no sessions. The radix caches are
flushed once at the end.

Hangs seen for real with SGLang, each bounded here: a server that rejects an update (HTTP
400 before it receives anything) while the trainer broadcasts: the first rejection ends the
sync with an error naming the server, the broadcast is not waited for, and the group is
abandoned (never reused); a trainer that died without destroying its group leaves the group
name taken on the servers: every engine joins under a fresh name
(``megappo_weight_sync_<random>``); the rendezvous and every collective of the group are
bounded by ``rollout.server_timeout_s``.

Partial rollouts (``RolloutEngine``'s pause / continue / abort): ``pause_generation(mode)``
(``/pause_generation``), ``continue_generation`` (``/continue_generation``) and
``abort_requests`` (``/abort_request`` with ``abort_all``; the aborted requests' answers
carry finish reason ``abort`` and their tokens so far; an ``abort`` answer with no abort
asked for during the call is SGLang giving up on it, an error). Control calls have their own
threads: a ``generate`` waiting on paused servers holds a generation thread per server, and
a shared pool once let it hold the very threads ``continue_generation`` needed (a request
sent while paused then never resumed).
``release_memory``/``resume_memory`` do nothing: the servers have
their own GPUs. ``weights_checksum`` is a spot-check read back from every server with
``POST /get_weights_by_name`` (``sglang_protocol``); servers that disagree are an error
naming them. Progress: ``on_progress`` is told as each server's share comes back.
"""

from __future__ import annotations

import datetime
import json
import socket
import urllib.error
import urllib.parse
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any, Iterable, Optional, Sequence

import torch
import torch.distributed as dist

from megappo.parallel.state import free_port
from megappo.rollout.engine import (
    PAUSE_MODES,
    Bucket,
    PauseMode,
    Progress,
    RolloutEngine,
    RolloutEngineError,
    Sample,
    SamplingParams,
    checksums_match,
)
from megappo.rollout.sglang_ports import own_rendezvous
from megappo.rollout.sglang_protocol import (
    GROUP_NAME,
    choose_spots,
    flatten_bucket,
    RoutingLayout,
    generate_request,
    init_group_request,
    parse_samples,
    spot_check,
    update_distributed_request,
    weights_by_name_request,
)


NOT_FOUND = object()
"""What ``_http(..., allow_404=True)`` returns for a route the server does not have."""


def join_update_group(
    master_address: str, master_port: int, *, world_size: int, rank: int, backend: str, timeout_s: float, group_name: str = GROUP_NAME
):
    """A process group outside the default one, rendezvousing at ``tcp://address:port``
    (rank 0 hosts the store), with SGLang's store prefixes (``init_custom_process_group``
    in ``sglang.srt.utils.common``): the only way both sides meet. Uses torch's internal
    ``_new_process_group_helper`` as SGLang does."""
    from torch.distributed.distributed_c10d import Backend, PrefixStore, _new_process_group_helper, _world, rendezvous

    timeout = datetime.timedelta(seconds=timeout_s)
    with own_rendezvous():  # under torchrun rank 0 would not host the store (sglang_ports.AGENT_STORE_ENV)
        store, rank, world_size = next(rendezvous(f"tcp://{master_address}:{master_port}", rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    pg, _ = _new_process_group_helper(
        world_size, rank, [], Backend(backend), PrefixStore(group_name, store), group_name=group_name, timeout=timeout
    )
    _world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


def _address_towards(url: str) -> str:
    """This host's address on the route to ``url``'s host (no packet is sent)."""
    host = urllib.parse.urlparse(url).hostname or "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((socket.gethostbyname(host), 9))
        return s.getsockname()[0]


class SGLangServerEngine(RolloutEngine):
    """SGLang servers by URL (module docstring)."""

    spot_checked = True

    def __init__(
        self,
        urls: Sequence[str],
        *,
        timeout_s: float,
        eos_token_ids: Sequence[int],
        owns_weight_updates: bool = True,
        backend: Optional[str] = None,
        routing: Optional[RoutingLayout] = None,
    ):
        if not urls:
            raise ValueError("rollout.server_urls is empty")
        self.urls = [u.rstrip("/") for u in urls]
        self.timeout_s = float(timeout_s)
        self.eos_token_ids = tuple(eos_token_ids)
        self.receives_weights = owns_weight_updates
        self.backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        self.name = "sglang servers " + ", ".join(self.urls)
        self._pool = ThreadPoolExecutor(max_workers=len(self.urls), thread_name_prefix="sglang-http")
        self._generation_pool = ThreadPoolExecutor(max_workers=len(self.urls), thread_name_prefix="sglang-generate")
        self._aborts = 0  # abort_requests / pause("abort") calls so far
        self._group = None
        self._group_name = GROUP_NAME
        self._sessions = True
        self._spots: Optional[dict[str, tuple[int, ...]]] = None
        self._routing = routing
        self._servers_report_routing: Optional[bool] = None  # asked at the first generate

    # ------------------------------------------------------------------- HTTP

    def _http(self, url: str, route: str, body: Any = None, *, method: str = "POST", allow_404: bool = False) -> Any:
        """One call; the decoded JSON answer (or text). Errors name ``url`` and ``route``."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url + route, data=data, method=method, headers={"Content-Type": "application/json"})
        where = f"SGLang server {url}: {method} {route}"
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        except (TimeoutError, socket.timeout) as e:
            raise RolloutEngineError(f"{where} timed out after {self.timeout_s:g} s") from e
        except urllib.error.URLError as e:
            if isinstance(e.reason, (TimeoutError, socket.timeout)):
                raise RolloutEngineError(f"{where} timed out after {self.timeout_s:g} s") from e
            raise RolloutEngineError(f"{where} failed: {e.reason}") from e
        except OSError as e:
            raise RolloutEngineError(f"{where} failed: {type(e).__name__}: {e}") from e
        try:
            answer = json.loads(raw) if raw else None
        except ValueError:
            answer = raw.decode(errors="replace")
        if status == 404 and allow_404:
            return NOT_FOUND
        if status != 200:
            raise RolloutEngineError(f"{where} answered {status}: {str(answer)[:500]}")
        if isinstance(answer, dict) and answer.get("success") is False:
            raise RolloutEngineError(f"{where} failed: {answer.get('message')}")
        return answer

    def _on_all(self, route: str, bodies: Sequence[Any], **kwargs) -> list[Any]:
        futures = [self._pool.submit(self._http, url, route, body, **kwargs) for url, body in zip(self.urls, bodies)]
        return [f.result() for f in futures]

    # ------------------------------------------------------------- generation

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams, on_progress: Optional[Progress] = None
    ) -> list[list[Sample]]:
        S = len(self.urls)
        shares = [list(range(s, len(prompts), S)) for s in range(S)]
        if self._routing is not None and self._servers_report_routing is None:
            infos = self._on_all("/get_server_info", [None] * S, method="GET")
            self._servers_report_routing = all(isinstance(i, dict) and bool(i.get("enable_return_routed_experts")) for i in infos)
        futures = {
            self._generation_pool.submit(self._generate_on, s, [prompts[i] for i in rows], params): s
            for s, rows in enumerate(shares) if rows
        }
        results: list[Optional[list[Sample]]] = [None] * len(prompts)
        for future in as_completed(futures):
            s = futures[future]
            for i, samples in zip(shares[s], future.result()):
                results[i] = samples
            if on_progress is not None:
                on_progress(len(shares[s]))
        return results  # type: ignore[return-value]

    def _generate_on(self, s: int, prompts: list, params: SamplingParams) -> list[list[Sample]]:
        aborts = self._aborts
        routing = self._routing if self._servers_report_routing else None  # servers without --enable-return-routed-experts: none
        answer = self._http(self.urls[s], "/generate", generate_request(prompts, params, self.eos_token_ids, routed_experts=routing is not None))
        return parse_samples(answer, len(prompts), params.n, f"SGLang server {self.urls[s]}", aborted=self._aborts != aborts,
                             prompts=prompts, routing=routing)

    def health(self) -> None:
        self._on_all("/health", [None] * len(self.urls), method="GET")

    # ------------------------------------------------- partial-rollout controls

    def pause_generation(self, mode: PauseMode = "retract") -> None:
        """``RolloutEngine.pause_generation`` on every server. ``in_place`` keeps a stale KV
        cache: SGLang 0.5.21 then crashes on an update with ``flush_cache``."""
        if mode not in PAUSE_MODES:
            raise ValueError(f"pause_generation mode must be one of {PAUSE_MODES}; got {mode!r}")
        self._aborts += mode == "abort"
        self._on_all("/pause_generation", [{"mode": mode}] * len(self.urls))

    def continue_generation(self) -> None:
        self._on_all("/continue_generation", [{}] * len(self.urls))

    def abort_requests(self) -> None:
        self._aborts += 1  # before the abort reaches a server: its answers then count as aborted
        self._on_all("/abort_request", [{"abort_all": True}] * len(self.urls))

    # ---------------------------------------------------------------- weights

    def update_weights(self, buckets: Iterable[Bucket]) -> None:
        if not self.receives_weights:
            raise RolloutEngineError(f"{self.name}: this replica does not send weights (the first data-parallel replica does)")
        if self._group is None:
            self._init_group()
        device = torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")
        self._spots = None
        if self._sessions:
            answers = self._on_all("/begin_weight_update", [{}] * len(self.urls), allow_404=True)
            found = [a is not NOT_FOUND for a in answers]
            if len(set(found)) > 1:
                raise RolloutEngineError(f"{self.name}: some servers have /begin_weight_update and some do not (mixed SGLang versions)")
            self._sessions = found[0]
        shapes: dict[str, tuple[int, ...]] = {}
        try:
            for bucket in buckets:
                body = update_distributed_request(bucket, flush_cache=False, group_name=self._group_name)
                flat = flatten_bucket(bucket).to(device)
                shapes.update((name, tuple(t.shape)) for name, t in bucket)
                futures = [self._pool.submit(self._http, url, "/update_weights_from_distributed", body) for url in self.urls]
                work = dist.broadcast(flat, group=self._group, group_src=0, async_op=True)
                for f in as_completed(futures):
                    f.result()  # a rejection (answered before receiving) raises now, not after a stuck broadcast
                work.wait()
                del flat
        except BaseException:
            self._abandon_group()  # a broadcast may be left half-done: never reuse the group
            raise
        if self._sessions:
            self._on_all("/end_weight_update", [{}] * len(self.urls))
        self._on_all("/flush_cache", [None] * len(self.urls))
        self._spots = {name: shapes[name] for name in choose_spots(shapes)}

    def _abandon_group(self) -> None:
        group, self._group = self._group, None
        if group is None:
            return
        for route, body in (("/end_weight_update", {}), ("/destroy_weights_update_group", {"group_name": self._group_name})):
            try:
                self._on_all(route, [body] * len(self.urls), allow_404=True)
            except RolloutEngineError:
                pass
        # Not destroyed here: with a broadcast still pending on it, destroying can block; the
        # group is dropped and a fresh one (fresh name) is made by the next sync.

    def _init_group(self) -> None:
        infos = self._on_all("/get_server_info", [None] * len(self.urls), method="GET")
        tp_sizes = [int(info.get("tp_size", 1)) if isinstance(info, dict) else 1 for info in infos]
        world_size = 1 + sum(tp_sizes)
        address = _address_towards(self.urls[0])
        port = free_port(address)
        offsets = [1 + sum(tp_sizes[:i]) for i in range(len(self.urls))]
        self._group_name = f"{GROUP_NAME}_{uuid.uuid4().hex[:12]}"  # a dead trainer's group may still hold the old name
        bodies = [init_group_request(address, port, off, world_size, self.backend, self._group_name) for off in offsets]
        futures = [self._pool.submit(self._http, url, "/init_weights_update_group", body) for url, body in zip(self.urls, bodies)]
        try:
            group = join_update_group(
                address, port, world_size=world_size, rank=0, backend=self.backend, timeout_s=self.timeout_s, group_name=self._group_name
            )
        except Exception as e:
            for f in futures:  # a server's own error says more than the rendezvous timeout
                f.result()
            raise RolloutEngineError(f"{self.name}: joining the weight-update group at {address}:{port} failed: {e}") from e
        for f in futures:
            f.result()
        self._group = group

    def checksum_scope(self) -> Optional[tuple[str, ...]]:
        return tuple(self._spots) if self._spots is not None else None

    def weights_checksum(self) -> float:
        """A spot-check read back from every server; they must agree (module docstring)."""
        if self._spots is None:
            raise RolloutEngineError(f"{self.name}: no complete weight sync from this engine yet")

        def server_checksum(url: str) -> float:
            def read(name: str):
                return self._http(url, "/get_weights_by_name", weights_by_name_request(name))

            return spot_check(read, self._spots, f"SGLang server {url}")

        values = [f.result() for f in [self._pool.submit(server_checksum, url) for url in self.urls]]
        differ = [url for url, v in zip(self.urls, values) if not checksums_match(v, values[0])]
        if differ:
            raise RolloutEngineError(f"{self.name}: the servers hold different weights: {differ} differ from {self.urls[0]}")
        return values[0]

    def shutdown(self) -> None:
        group, self._group = self._group, None
        if group is not None:
            try:
                self._on_all("/destroy_weights_update_group", [{"group_name": self._group_name}] * len(self.urls))
            except RolloutEngineError:
                pass
            dist.destroy_process_group(group)
        self._pool.shutdown(wait=False)
        self._generation_pool.shutdown(wait=False)
