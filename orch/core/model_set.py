"""Models on demand, the pure part: how much memory a model needs, which idle models make
room for it, which idle models have outlived their keep_alive, and one load per model.

The Ray side (orch/pools/demand.py) asks these functions and acts; nothing here waits,
loads or imports Ray, so every rule is tested on plain data.

Fit estimate: the model file's size plus its KV cache for ``ctx`` x ``slots`` tokens,
``n_layer x n_ctx x n_embd_kv x 2 (K and V) x bytes per element`` (f16), with the sizes
read from the GGUF header when the file is a GGUF, else a per-token guess from the file size.
The header is read here (not with orch/provision/gguf.py) because the config layer, which
sits below provisioning, refuses a model too large for every budget at load.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from orch.core.model_ref import ModelRefError, parse_ref, resolve_local_path

#: Bytes per KV element (llama.cpp's default f16 cache).
KV_BYTES_PER_ELEMENT = 2
#: Bytes per element of a checkpoint's ``torch_dtype`` (its KV cache is kept at that dtype).
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "int8": 1}
#: Bounds of the header walk (no real model has more keys, or longer strings).
_MAX_KEYS = 100_000
_MAX_STRING = 64 * 1024 * 1024
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_PROJECT_ROOT = Path(__file__).resolve().parents[2]


def fmt_bytes(value: Optional[int]) -> str:
    if value is None:
        return "unknown"
    if value < 1024**2:
        return f"{value} B"
    return f"{value / 1024**3:.2f} GiB" if value >= 1024**3 else f"{value / 1024**2:.1f} MiB"


@dataclass(frozen=True)
class ModelShape:
    """What the fit estimate needs from a model file."""

    file_bytes: int
    n_layer: Optional[int] = None
    #: K (and V) width per token and layer: head size x KV heads.
    n_embd_kv: Optional[int] = None
    kv_bytes_per_element: int = KV_BYTES_PER_ELEMENT

    def kv_bytes(self, ctx: int, slots: int) -> int:
        tokens = ctx * slots
        if self.n_layer and self.n_embd_kv:
            return self.n_layer * tokens * self.n_embd_kv * 2 * self.kv_bytes_per_element
        return tokens * max(16 * 1024, self.file_bytes // 20_000)  # the engines' own guess without a header

    def estimate(self, ctx: int, slots: int) -> int:
        return self.file_bytes + self.kv_bytes(ctx, slots)


def read_shape(path: Path | str) -> ModelShape:
    """The file's size, and its layer count and KV width when it is a readable GGUF; for a
    checkpoint directory, its safetensors' size and the sizes in its config.json."""
    path = Path(path)
    if path.is_dir():
        return _checkpoint_shape(path)
    size = path.stat().st_size
    try:
        meta = _gguf_numbers(path)
    except (OSError, ValueError, struct.error):
        return ModelShape(size)
    arch = meta.get("general.architecture")
    n_layer = meta.get(f"{arch}.block_count")
    n_embd, n_head = meta.get(f"{arch}.embedding_length"), meta.get(f"{arch}.attention.head_count")
    n_head_kv = meta.get(f"{arch}.attention.head_count_kv", n_head)
    head_k = meta.get(f"{arch}.attention.key_length") or (n_embd // n_head if n_embd and n_head else None)
    n_embd_kv = head_k * n_head_kv if head_k and isinstance(n_head_kv, int) else None
    return ModelShape(size, n_layer if isinstance(n_layer, int) else None, n_embd_kv)


def _checkpoint_shape(folder: Path) -> ModelShape:
    """A Hugging Face checkpoint: the weights' bytes, and KV at the model's dtype."""
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return ModelShape(size)
    text = config.get("text_config") or config
    n_layer, n_head = text.get("num_hidden_layers"), text.get("num_attention_heads")
    head = text.get("head_dim") or (text["hidden_size"] // n_head if text.get("hidden_size") and n_head else None)
    n_kv = text.get("num_key_value_heads") or n_head
    dtype = DTYPE_BYTES.get(str(text.get("torch_dtype") or config.get("torch_dtype")), 2)
    n_embd_kv = head * n_kv if head and n_kv else None
    return ModelShape(size, n_layer if isinstance(n_layer, int) else None, n_embd_kv, dtype)


def _gguf_numbers(path: Path) -> dict[str, object]:
    """The GGUF header's scalar and string metadata (arrays skipped), bounds-checked."""
    meta: dict[str, object] = {}
    with path.open("rb") as f:
        def take(fmt: str):
            raw = f.read(struct.calcsize(fmt))
            return struct.unpack(fmt, raw)[0]

        def text(keep: bool = True) -> Optional[str]:
            length = take("<Q")
            if length > _MAX_STRING:
                raise ValueError("string too long")
            if not keep:
                f.seek(length, 1)
                return None
            return f.read(length).decode("utf-8", errors="replace")

        if f.read(4) != b"GGUF" or take("<I") not in (2, 3):
            raise ValueError("not a GGUF file")
        take("<Q")
        count = take("<Q")
        if count > _MAX_KEYS:
            raise ValueError("too many keys")
        for _ in range(count):
            key, kind = text(), take("<I")
            if kind in _SCALARS:
                meta[key] = take(_SCALARS[kind])
            elif kind == 8:
                meta[key] = text()
            elif kind == 9:
                item, items = take("<I"), take("<Q")
                if item in _SCALARS:
                    f.seek(items * struct.calcsize(_SCALARS[item]), 1)
                elif item == 8:
                    for _ in range(items):
                        text(keep=False)
                else:
                    raise ValueError("nested arrays")
            else:
                raise ValueError(f"value type {kind}")
    return meta


def local_path(ref: str) -> Optional[Path]:
    """Where a local ref's file is (``pkg:``, ``file:``, a path); None: remote or missing."""
    try:
        parsed = parse_ref(ref)
        if not parsed.is_local:
            return None
        return resolve_local_path(parsed, _PROJECT_ROOT)
    except ModelRefError:
        return None


def estimate_for_ref(ref: str, ctx: int, slots: int) -> Optional[int]:
    """Bytes a local model (a GGUF, or a safetensors checkpoint directory) needs loaded;
    None when it is not here (catalog, hf:)."""
    path = local_path(ref)
    if path is None:
        return None
    try:
        return read_shape(path).estimate(ctx, slots)
    except OSError:
        return None


# -- the state a planner reads ------------------------------------------------------------
UNLOADED, LOADING, LOADED = "unloaded", "loading", "loaded"


@dataclass
class ModelRecord:
    """One model of the set as the manager sees it."""

    id: str
    size_bytes: Optional[int] = None
    pinned: bool = False
    keep_alive: float = 300
    #: The budget the model may use (None: any).
    budget: Optional[str] = None
    state: str = UNLOADED
    #: The budget it is loaded (or loading) into.
    loaded_in: Optional[str] = None
    since: Optional[float] = None
    last_used: Optional[float] = None
    #: Queued or running tasks, as the pool last reported.
    busy: bool = False
    #: GPUs the model spans (tensor parallel: each holds an equal share); 0: not on GPUs.
    gpu_count: int = 0
    #: Which GPUs of its budget's group it holds (indexes), when loaded or loading.
    gpus: tuple[int, ...] = ()

    @property
    def holds_memory(self) -> bool:
        return self.state in (LOADING, LOADED)

    def share(self) -> int:
        """Bytes it holds on each of its GPUs."""
        return math.ceil((self.size_bytes or 0) / len(self.gpus)) if self.gpus else 0


@dataclass(frozen=True)
class Room:
    """A budget as the planner sees it. ``total``: bytes its models may take together (None:
    unknown, taken as room). ``per_gpu``: for a GPU group, each GPU's bytes: declared sizes,
    or (``measured``) the free memory NVML reads now, from which what is loaded is already
    gone. ``per_gpu_total``: each GPU's whole memory, to tell "too big" from "full"."""

    total: Optional[int] = None
    per_gpu: tuple[int, ...] = ()
    measured: bool = False
    per_gpu_total: tuple[int, ...] = ()

    def capacity(self) -> tuple[int, ...]:
        return self.per_gpu_total or (() if self.measured else self.per_gpu)


@dataclass(frozen=True)
class Plan:
    """Where a model loads, on which GPUs of the budget's group, and what to unload first
    (least recently used first)."""

    budget: str
    evict: tuple[str, ...] = ()
    gpus: tuple[int, ...] = ()


class NoRoom(Exception):
    """Nothing can be evicted to make room; the message names what holds the memory.
    ``too_big``: the model exceeds every budget even empty (waiting will not help)."""

    def __init__(self, message: str, too_big: bool = False) -> None:
        super().__init__(message)
        self.too_big = too_big


def used_bytes(records: Iterable[ModelRecord], budget: str) -> int:
    return sum(r.size_bytes or 0 for r in records if r.holds_memory and r.loaded_in == budget)


def evictable(record: ModelRecord, drain_busy: bool = False) -> bool:
    """Loaded and unpinned, and idle unless busy models may be drained first."""
    return record.state == LOADED and not record.pinned and (drain_busy or not record.busy)


def plan_load(target: ModelRecord, records: list[ModelRecord], budgets: dict[str, "Optional[int] | Room"],
              drain_busy: bool = False) -> Plan:
    """The budget ``target`` loads into, its GPUs there, and the idle unpinned models to unload
    first, in LRU order; the budget needing the fewest evictions wins, then the one whose
    victims were used least recently (LRU across budgets: nodes, GPU groups), then the most
    room, then its id. A budget of unknown size is taken as having room. On a GPU group a
    model spanning N GPUs needs N GPUs each with room for size/N. ``drain_busy``: busy models
    may go too (to be drained first), after every idle one. Raises NoRoom."""
    names = [target.budget] if target.budget else sorted(budgets)
    options: list[tuple[int, float, int, str, tuple[str, ...], tuple[int, ...]]] = []
    for name in names:
        room = as_room(budgets.get(name))
        if room.total is None and not room.per_gpu:
            options.append((0, 0.0, 0, name, (), ()))
            continue
        free = room.total - used_bytes(records, name) if room.total is not None else None
        gpu_free = _gpu_free(room, records, name)
        victims: list[ModelRecord] = []
        idle = sorted((r for r in records if r.loaded_in == name and evictable(r, drain_busy) and r.id != target.id),
                      key=lambda r: (r.busy, r.last_used or r.since or 0.0, r.id))
        chosen = _fits(target, free, gpu_free)
        for record in idle:
            if chosen is not None:
                break
            victims.append(record)
            free = free + (record.size_bytes or 0) if free is not None else None
            for index in record.gpus:
                if index < len(gpu_free):
                    gpu_free[index] += record.share()
            chosen = _fits(target, free, gpu_free)
        if chosen is not None:
            newest = max((v.last_used or v.since or 0.0 for v in victims), default=0.0)
            options.append((len(victims), newest, -(free or 0), name, tuple(v.id for v in victims), chosen))
    if not options:
        raise NoRoom(*_no_room(target, records, {name: as_room(budgets.get(name)) for name in names}))
    _, _, _, name, victims, gpus = min(options)
    return Plan(name, victims, gpus)


def as_room(budget: "Optional[int] | Room") -> Room:
    return budget if isinstance(budget, Room) else Room(budget)


def _gpu_free(room: Room, records: list[ModelRecord], name: str) -> list[int]:
    """Each GPU's room now. Measured figures already lack what is loaded; a model still
    loading may not have taken its memory yet, so its share comes off either way."""
    free = list(room.per_gpu)
    for record in records:
        if record.loaded_in != name or not record.holds_memory:
            continue
        if room.measured and record.state != LOADING:
            continue
        for index in record.gpus:
            if index < len(free):
                free[index] -= record.share()
    return free


def _fits(target: ModelRecord, free: Optional[int], gpu_free: list[int]) -> Optional[tuple[int, ...]]:
    """The GPUs ``target`` would take (() off GPUs) when it fits, else None."""
    needed = target.size_bytes or 0
    if free is not None and free < needed:
        return None
    if not gpu_free or target.gpu_count <= 0:
        return ()
    share = math.ceil(needed / target.gpu_count)
    roomiest = sorted(range(len(gpu_free)), key=lambda i: (-gpu_free[i], i))
    picked = [i for i in roomiest if gpu_free[i] >= share][:target.gpu_count]
    return tuple(sorted(picked)) if len(picked) == target.gpu_count else None


def too_big(target: ModelRecord, room: Room) -> bool:
    """The model exceeds the budget even with nothing else loaded."""
    needed = target.size_bytes or 0
    if room.total is not None and needed > room.total:
        return True
    capacity = room.capacity()
    if capacity and target.gpu_count > 0:
        if target.gpu_count > len(capacity):
            return True
        return sum(1 for size in capacity if size >= math.ceil(needed / target.gpu_count)) < target.gpu_count
    return False


def _no_room(target: ModelRecord, records: list[ModelRecord], rooms: dict[str, Room]) -> tuple[str, bool]:
    parts = []
    for name, room in rooms.items():
        holders = [r for r in records if r.holds_memory and r.loaded_in == name]
        held = ", ".join(f"'{r.id}' {fmt_bytes(r.size_bytes)} ({_why_kept(r)})" for r in holders) or "nothing"
        parts.append(f"budget '{name}' ({_fmt_room(room)}) holds {held}")
    needs = f"model '{target.id}' needs about {fmt_bytes(target.size_bytes)}"
    if target.gpu_count > 1:
        needs += f" ({fmt_bytes(math.ceil((target.size_bytes or 0) / target.gpu_count))} on each of " \
                 f"{target.gpu_count} GPUs)"
    if all(too_big(target, room) for room in rooms.values()):
        return (f"{needs}, more than any budget holds: {'; '.join(parts)}; use a smaller ctx, fewer slots or a "
                "smaller model", True)
    return (f"{needs} and nothing can be evicted to make room: {'; '.join(parts)}; retry once a model is idle, "
            "or unload one", False)


def _fmt_room(room: Room) -> str:
    parts = [fmt_bytes(room.total)] if room.total is not None or not room.per_gpu else []
    if room.per_gpu:
        gpus = "GPUs " + " / ".join(fmt_bytes(size) for size in room.per_gpu)
        gpus += " free now" if room.measured else " each"
        if room.measured and room.per_gpu_total:
            gpus += " of " + " / ".join(fmt_bytes(size) for size in room.per_gpu_total)
        parts.append(gpus)
    return ", ".join(parts)


def _why_kept(record: ModelRecord) -> str:
    if record.state == LOADING:
        return "loading"
    if record.pinned:
        return "pinned"
    return "busy" if record.busy else "idle"


def expired(records: Iterable[ModelRecord], now: float) -> list[str]:
    """Loaded, idle, unpinned models whose keep_alive has run out since their last use
    (keep_alive 0: as soon as idle; -1: never)."""
    out = []
    for record in records:
        if not evictable(record) or record.keep_alive < 0:
            continue
        last = record.last_used if record.last_used is not None else record.since
        if last is not None and now - last >= record.keep_alive:
            out.append(record.id)
    return out


@dataclass
class LoadBook:
    """Single flight: one load per model at a time; later asks join it."""

    started: dict[str, float] = field(default_factory=dict)
    joined: dict[str, int] = field(default_factory=dict)

    def begin(self, model_id: str, now: float) -> bool:
        """True: the caller owns the new load; False: one is in flight and the caller joined it."""
        if model_id in self.started:
            self.joined[model_id] = self.joined.get(model_id, 0) + 1
            return False
        self.started[model_id] = now
        self.joined[model_id] = 0
        return True

    def loading(self, model_id: str) -> bool:
        return model_id in self.started

    def end(self, model_id: str, now: float) -> float:
        """The load is over (loaded or failed): its duration in seconds."""
        self.joined.pop(model_id, None)
        return now - self.started.pop(model_id, now)
