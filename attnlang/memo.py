"""TensorMemo: values derived from a tensor (its value range, an int32 copy, a cache-key token), computed once
while that very tensor object is alive and unmodified, so repeated calls with the same tensors cost no device
sync. "Unmodified": the version counter is unchanged and, for CPU tensors, so is a checksum of the bytes, which
also sees writes the version counter misses (``t.data[i] = x``, ``t.numpy()[i] = x``, DLPack aliases); CUDA
tensors are judged by their version counter alone (reading a checksum would sync the device on every call), so
such unversioned writes to a CUDA tensor are not seen: bind a new tensor instead.
IdentityMemo: values derived from objects that are costly to hash (bound ASTs), keyed by identity.
Shared by the call checks and the backends."""

from __future__ import annotations

import weakref
import zlib
from collections import OrderedDict

import torch

__all__ = ["TensorMemo", "MEMO", "IdentityMemo", "fingerprint"]


def fingerprint(t: torch.Tensor):
    """A checksum of a CPU tensor's values that changes whenever an element does, however it was written: the
    CRC-32 of its bytes and their count (one pass over them, about 2 GB/s; a call reads the tensor anyway). None
    for tensors on other devices (their version counter stands alone there)."""
    if t.device.type != "cpu":
        return None
    x = t.detach().reshape(-1)
    if x.numel() and x.stride(0) != 1:
        # also a one-element view of a strided tensor, which is_contiguous() calls contiguous whatever its stride
        x = x.clone(memory_format=torch.contiguous_format)
    raw = x.view(torch.uint8).numpy()
    return raw.size, zlib.crc32(raw)


_SELF = object()  # an entry's value that is its tensor itself (held weakly, as the key)


class TensorMemo:
    """An LRU of ``fn(t)`` keyed by (tensor object, tag), valid while ``t._version`` and ``fingerprint(t)`` are
    unchanged.

    Inference-mode tensors keep no version counter: on the CPU their checksum alone keys the entry; elsewhere
    nothing is cached for them and ``fn`` runs every time.

    An entry goes with its tensor: it holds ``t`` weakly (a value that is ``t`` itself, as ``t.contiguous()`` of a
    contiguous tensor, is not held), and is dropped when ``t`` is freed, so a value derived from it (an int32
    copy) is freed with it.
    """

    def __init__(self, size: int = 256):
        self._entries: OrderedDict = OrderedDict()
        self._size = size

    def get(self, t: torch.Tensor, tag: str, fn):
        try:
            version = t._version
        except RuntimeError:  # "Inference tensors do not track version counter"
            version = None
        check = fingerprint(t)
        if version is None and check is None:
            return fn(t)
        version = (version, check)
        key = (id(t), tag)
        hit = self._entries.get(key)
        if hit is not None and hit[0]() is t and hit[1] == version:
            self._entries.move_to_end(key)
            return t if hit[2] is _SELF else hit[2]
        value = fn(t)
        entries = self._entries

        def forget(ref, key=key):  # t was freed: its entry (and what it derived) goes now, not 256 entries later
            got = entries.get(key)
            if got is not None and got[0] is ref:
                del entries[key]
        self._entries[key] = (weakref.ref(t, forget), version, _SELF if value is t else value)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)
        return value

    def token(self, t: torch.Tensor):
        """A cache-key part that is only ever equal for the same live, unmodified tensor."""
        return self.get(t, "token", lambda _: object())


# entries go with their tensors (weakly held), so the size only bounds live ones: a model's per-layer tensors times
# the tags read per call (token, value range, aux copy, ...) must fit, or warm calls recompute them
MEMO = TensorMemo(4096)


class IdentityMemo:
    """``compute()`` cached per (identity of ``objs``, hashable ``extra``). Hashing a bound expression walks the
    whole tree, which costs more per call than the lookup; the bound expressions of a variant are the same objects
    call after call. Each entry keeps its objects alive, so an id is never reused while its entry exists."""

    def __init__(self, size: int = 256):
        self._entries: dict = {}
        self._size = size

    def get(self, objs: tuple, extra, compute):
        key = (tuple(map(id, objs)), extra)
        hit = self._entries.get(key)
        if hit is not None and all(a is b for a, b in zip(hit[0], objs)):
            return hit[1]
        value = compute()
        if len(self._entries) >= self._size:
            self._entries.clear()
        self._entries[key] = (objs, value)
        return value
