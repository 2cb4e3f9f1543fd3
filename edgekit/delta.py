"""Binary deltas between two bundle files, for updates of a model a device already holds (docs/protocol.md,
"Delta updates").

A delta is one zstd frame of the target file compressed with the base file as its history (zstd's `--patch-from`:
the base is a raw-content dictionary, the window covers base and target, long-distance matching finds the moved
blocks). zstd, not bsdiff: encoding is linear in time with memory a few times the files (bsdiff's suffix sort
takes ~17 bytes per base byte and minutes on a large model), the unchanged tail of a tensor or a re-laid tar
compresses as well, and the `zstandard` wheels cover every platform the agent runs on. The frame carries the
target's size and a checksum; whoever applies it still checks the whole target's sha256.

Shared by the hub (encodes) and the agent (applies): imports no side.
"""

import importlib.util
import math

MAX_WINDOW_LOG = 30  # zstd's limit on 32-bit decoders: base + target up to 1 GiB
MIN_WINDOW_LOG = 10
# Level 15: deltas within 6 % of level 19's on the int8 bundles of benchmarks/update_bench.py, made 2-5 times
# faster there and 10 times on 9.5 MB of fp32 weights (0.35 s, not 3.8 s): the first device asking for a new pair
# waits for it.
LEVEL = 15
MAX_BASE_PLUS_TARGET = 1 << MAX_WINDOW_LOG


class DeltaError(Exception):
    """No delta can be made or applied; the message says why."""


def supported() -> bool:
    """Whether this install can make and apply deltas (`zstandard`, in the agent and hub extras, is there): a device
    installed before delta updates, or by hand without it, asks for whole bundles as before."""
    return importlib.util.find_spec("zstandard") is not None


def _window_log(base: bytes, target_size: int) -> int:
    needed = len(base) + target_size
    if needed > MAX_BASE_PLUS_TARGET:
        raise DeltaError(f"base and target are {needed} bytes together; a delta covers at most {MAX_BASE_PLUS_TARGET}")
    return max(MIN_WINDOW_LOG, math.ceil(math.log2(max(needed, 2))))


def encode_delta(base: bytes, target: bytes) -> bytes:
    """The delta that turns `base` into `target`."""
    import zstandard

    params = zstandard.ZstdCompressionParameters.from_level(
        LEVEL, window_log=_window_log(base, len(target)), enable_ldm=True, write_checksum=True
    )
    dictionary = zstandard.ZstdCompressionDict(base, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    return zstandard.ZstdCompressor(dict_data=dictionary, compression_params=params).compress(target)


def apply_delta(base: bytes, delta: bytes, target_size: int) -> bytes:
    """The target `delta` was made for from `base`; raises DeltaError when the delta is damaged, made from another
    base (the frame's checksum fails) or does not give `target_size` bytes."""
    import zstandard

    dictionary = zstandard.ZstdCompressionDict(base, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    decoder = zstandard.ZstdDecompressor(dict_data=dictionary, max_window_size=1 << _window_log(base, target_size))
    try:
        target = decoder.decompress(delta, max_output_size=target_size)
    except zstandard.ZstdError as error:
        raise DeltaError(f"the delta cannot be applied: {error}") from None
    if len(target) != target_size:
        raise DeltaError(f"the delta gives {len(target)} bytes, the target has {target_size}")
    return target
