"""A Replicator storage plugin written in Python (built with componentize-py).

It owns the log of one partition, kept in the directory the host preopens as
`/data` (and nothing else: each partition gets its own instance). The
semantics mirror the Rust plugins (`plugins/sdk/src/index.rs`) exactly.

On-disk layout of `/data`:

- `<base:020>.log`: the log, record batches back to back exactly as the host
  sent them. `base` is the offset of the first batch the file holds (or the
  log end, when it holds none). Normally there is exactly one such file; a
  compaction writes a new one under a higher base and then removes the old,
  so after a crash the highest base wins.
- `log-start`, `high-watermark`: decimal checkpoints.
- `leader-epochs`: Kafka's checkpoint text: `0`, the count, `epoch offset`
  lines.
- `*.tmp`: a checkpoint or compaction caught mid-write; removed on open.

Every checkpoint is replaced atomically (temp file, fsync, rename), so a
crash leaves the old or the new one, never half of each.

Recovery (in `open`) walks the log checking each batch's framing and that
offsets are contiguous, and checks CRC-32C for the batches in the last
`CRC_TAIL` bytes, where a torn write can be. The first bad batch and
everything after it are cut off the file.

The index (base offset -> file position and length) lives in memory as
parallel lists, so a read is a bisection plus one positional read.
"""

import bisect
import os
import struct
import time

from wit_world import exports
from wit_world.exports.storage import EpochEntry
from wit_world.imports import host
from wit_world.imports.types import (
    OffsetBounds,
    PluginError_Conflict,
    PluginError_Corrupt,
    PluginError_InvalidInput,
    PluginError_Io,
    PluginError_OffsetOutOfRange,
)
from wit_world.types import Err

DATA = "/data"
HEADER_LEN = 44
MAGIC = 1
MAX_BATCH_LEN = 16 * 1024 * 1024
U64_MAX = (1 << 64) - 1
# Batches ending in the last CRC_TAIL bytes of the log get their CRC checked
# on open. Pure-Python CRC runs at about 1 MB/s in the component (opening a
# 12 MB log takes ~4 s), so checking a multi-GB log would blow the host's
# 120 s open deadline; a torn write is always at the tail. Earlier batches
# still get framing and contiguity checks (and the host checks every CRC on
# read).
CRC_TAIL = 4 * 1024 * 1024
# Compact the log file on delete-prefix once this many dead bytes lead it
# (and they outnumber the live ones): a rewrite costs a copy of the live
# data. The `compact.bytes` setting overrides it (tests use a small one).
COMPACT_MIN = 8 * 1024 * 1024
# Bytes asked for per read call. Replicator's host answers up to 1 MiB,
# wasmtime-wasi's own read at most 64 KiB; a short read is read on.
READ_CHUNK = 64 * 1024
# Bytes of log read at a time while scanning on open.
SCAN_WINDOW = 1024 * 1024
HEADER = struct.Struct("<QIIBBHIIqq")


# ---------------------------------------------------------------- CRC-32C


def _crc_table():
    poly = 0x82F63B78  # Castagnoli, reflected
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ poly if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _crc_table()


def crc32c(data, start=0, end=None):
    """CRC-32C of data[start:end] (the stdlib has only CRC-32/IEEE)."""
    table = _CRC_TABLE
    crc = 0xFFFFFFFF
    for b in memoryview(data)[start:end]:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


# ---------------------------------------------------------------- errors


class Refused(Exception):
    """An expected failure, carried up to the WIT boundary as `err`."""

    def __init__(self, error):
        super().__init__(error)
        self.error = error


def invalid(msg):
    return Refused(PluginError_InvalidInput(msg))


def conflict(msg):
    return Refused(PluginError_Conflict(msg))


def corrupt(msg):
    return Refused(PluginError_Corrupt(msg))


def io_error(what, e):
    return Refused(PluginError_Io(f"{what}: {e}"))


def boundary(fn):
    """Turn expected failures into the WIT error variants. OS errors are
    `io`; anything else is a bug and is left to trap, so the host drops this
    instance and opens a fresh one instead of trusting a half-updated state."""

    def wrapped(*args):
        try:
            return fn(*args)
        except Refused as r:
            raise Err(r.error)
        except OSError as e:
            raise Err(PluginError_Io(f"{fn.__name__}: {e}"))

    wrapped.__name__ = fn.__name__
    return wrapped


def log(level, msg):
    host.log(level, msg)


# ---------------------------------------------------------------- batches


def parse_header(buf, at, have):
    """(base, length, count, epoch) of the batch at buf[at:], checking what
    the SDK's `BatchHeader::parse` checks; raises `invalid` otherwise.
    `have` is how many bytes of the batch are available from `at`."""
    if have < HEADER_LEN:
        raise invalid(f"batch truncated: needs {HEADER_LEN} bytes, have {have}")
    base, length, _crc, magic, _attr, _res, epoch, count, _t0, _t1 = HEADER.unpack_from(buf, at)
    if length < HEADER_LEN or length > MAX_BATCH_LEN:
        raise invalid(f"batch length {length} outside {HEADER_LEN}..={MAX_BATCH_LEN}")
    if magic != MAGIC:
        raise invalid(f"unknown batch format version {magic}")
    if count == 0:
        raise invalid("batch holds no records")
    if base + count > U64_MAX:
        raise invalid("batch offsets overflow u64")
    if have < length:
        raise invalid(f"batch truncated: needs {length} bytes, have {have}")
    return base, length, count, epoch


def crc_ok(buf, at, length):
    (stored,) = struct.unpack_from("<I", buf, at + 12)
    return crc32c(buf, at + 16, at + length) == stored


# ---------------------------------------------------------------- files


def path(name):
    return f"{DATA}/{name}"


def seg_name(base):
    return f"{base:020d}.log"


def write_all(fd, data, pos):
    """Positional write of all of `data` (one call in the common case)."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, pos)
        view = view[n:]
        pos += n


def read_exact(fd, length, pos):
    parts = []
    while length > 0:
        chunk = os.pread(fd, min(length, READ_CHUNK), pos)
        if not chunk:
            raise corrupt(f"log ends early at byte {pos}")
        parts.append(chunk)
        pos += len(chunk)
        length -= len(chunk)
    return b"".join(parts)


def sync_dir():
    # Not every WASI host lets a directory be synced; the renames it would
    # order are still atomic, so a failure here is not an error.
    try:
        fd = os.open(DATA, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def write_atomic(name, data):
    tmp = path(name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        write_all(fd, data, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path(name))
    sync_dir()


def read_small(name):
    try:
        with open(path(name), "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def parse_u64(data, name):
    try:
        v = int(data.decode().strip())
    except (UnicodeDecodeError, ValueError):
        raise corrupt(f"checkpoint `{name}` is not a number")
    if not 0 <= v <= U64_MAX:
        raise corrupt(f"checkpoint `{name}` is out of range")
    return v


def parse_epochs(data):
    bad = corrupt("checkpoint `leader-epochs` is malformed")
    try:
        lines = data.decode().splitlines()
        if len(lines) < 2 or lines[0] != "0":
            raise bad
        count = int(lines[1])
        out = []
        for line in lines[2:]:
            e, s = line.split(" ")
            e, s = int(e), int(s)
            # Out of the WIT types' range would trap on the way out.
            if not (0 <= e < 1 << 32 and 0 <= s < 1 << 64):
                raise bad
            out.append((e, s))
    except (UnicodeDecodeError, ValueError):
        raise bad
    if len(out) != count:
        raise bad
    return out


def parse_config(pairs):
    """(fsync mode, interval seconds, compaction threshold) from `fsync` =
    always|interval|never, `fsync.interval.ms` and `compact.bytes`; unknown
    keys are refused like the Rust plugins do."""
    mode, interval_ms, compact = "interval", 1000, COMPACT_MIN
    for k, v in pairs:
        if k == "fsync":
            if v not in ("always", "interval", "never"):
                raise invalid(f"fsync = `{v}`: want always, interval or never")
            mode = v
        elif k == "fsync.interval.ms":
            if not v.isascii() or not v.isdigit() or int(v) > 86_400_000:
                raise invalid(f"fsync.interval.ms = `{v}`: want milliseconds from 0 to 86400000")
            interval_ms = int(v)
        elif k == "compact.bytes":
            if not v.isascii() or not v.isdigit() or int(v) > 1 << 40:
                raise invalid(f"compact.bytes = `{v}`: want a byte count from 0 to 2^40")
            compact = int(v)
        else:
            raise invalid(
                f"unknown setting `{k}`; storage-python takes fsync (always|interval|never), "
                "fsync.interval.ms, compact.bytes"
            )
    return mode, interval_ms / 1000.0, compact


# ---------------------------------------------------------------- the log


class Storage(exports.Storage):
    pass


class PartitionLog(exports.storage.PartitionLog):
    """One partition's log: the open log file plus the in-memory index.

    Index invariants (as in the SDK's OffsetIndex): entries are contiguous
    (`nexts[i] == bases[i + 1]`), `file_base <= bases[0] <= log_start` (the
    start may fall inside the first batch), `nexts[-1] == log_end` when
    there are entries, and `log_start <= log_end`. `poss[i]` is the batch's
    byte position in the current log file and `lens[i]` its length; batches
    are back to back, so `poss[i + 1] == poss[i] + lens[i]`."""

    def __init__(self, fsync_mode, fsync_interval, compact_bytes):
        self.fsync_mode = fsync_mode
        self.fsync_interval = fsync_interval
        self.compact_bytes = compact_bytes
        self.fd = -1
        self.file_base = 0
        self.size = 0  # bytes of whole batches in the file
        self.bases, self.nexts, self.poss, self.lens = [], [], [], []
        self.log_start = self.log_end = 0
        self.hw = 0
        self.epochs = []  # [(epoch, start offset)]
        self.unsynced = False
        self.last_sync = time.monotonic()

    # ---- open and recovery

    @classmethod
    @boundary
    def open(cls, topic, partition, config):
        log_ = cls(*parse_config(config))
        log_.recover()
        return log_

    def recover(self):
        bases = []
        for name in os.listdir(DATA):
            if name.endswith(".tmp"):
                os.remove(path(name))
            elif name.endswith(".log") and len(name) == 24 and name[:20].isdigit():
                bases.append(int(name[:20]))
        bases.sort()
        # Older files are leftovers of a compaction or reset that crashed
        # after the new file was in place: the newest is complete.
        for b in bases[:-1]:
            os.remove(path(seg_name(b)))
        start_ckpt = None
        data = read_small("log-start")
        if data is not None:
            start_ckpt = parse_u64(data, "log-start")
        if bases:
            self.file_base = bases[-1]
        else:
            self.file_base = start_ckpt or 0
        self.fd = os.open(path(seg_name(self.file_base)), os.O_RDWR | os.O_CREAT)
        self.log_start = self.log_end = self.file_base
        self.scan()
        if start_ckpt is not None and start_ckpt > self.log_end:
            # A reset past the end was checkpointed but the crash came before
            # the new file was made: finish it.
            log(host.LogLevel.INFO, f"completing an interrupted reset to offset {start_ckpt}")
            self.start_afresh(start_ckpt)
        if start_ckpt is not None:
            self.log_start = min(max(start_ckpt, self.log_start), self.log_end)
        data = read_small("high-watermark")
        if data is not None:
            self.hw = parse_u64(data, "high-watermark")
        data = read_small("leader-epochs")
        if data is not None:
            self.epochs = parse_epochs(data)
        self.trim_epochs()

    def scan(self):
        """Index the log file's whole batches and cut whatever follows the
        last good one (a torn write, or garbage)."""
        fd = self.fd
        file_size = os.fstat(fd).st_size
        crc_from = max(0, file_size - CRC_TAIL)
        pos, expected = 0, self.file_base
        # Headers are read through a window of SCAN_WINDOW bytes: one host
        # call per window instead of one per batch.
        window, wstart = b"", 0
        while pos < file_size:
            avail = file_size - pos
            if avail < HEADER_LEN:
                break
            if pos + HEADER_LEN > wstart + len(window):
                window, wstart = read_exact(fd, min(SCAN_WINDOW, avail), pos), pos
            at = pos - wstart
            try:
                # `avail` as the batch's bytes: a batch longer than what is
                # left of the file is a torn write.
                base, length, count, _epoch = parse_header(window, at, avail)
            except Refused:
                break
            if base != expected:
                break
            if pos + length > crc_from:
                if pos + length > wstart + len(window):
                    window, wstart = read_exact(fd, min(max(SCAN_WINDOW, length), avail), pos), pos
                    at = 0
                if not crc_ok(window, at, length):
                    break
            self.push(base, base + count, pos, length)
            expected = base + count
            pos += length
        if pos < file_size:
            log(
                host.LogLevel.WARN,
                f"cut {file_size - pos} torn or corrupt bytes from {seg_name(self.file_base)} at position {pos}",
            )
            os.ftruncate(fd, pos)
            os.fsync(fd)
        self.size = pos

    def push(self, base, nxt, pos, length):
        self.bases.append(base)
        self.nexts.append(nxt)
        self.poss.append(pos)
        self.lens.append(length)
        self.log_end = nxt

    def start_afresh(self, at):
        """Make the log empty at offset `at`: a fresh file named `at`, then
        the old one removed (a crash in between leaves both; open keeps the
        newer)."""
        old = self.file_base
        new_fd = os.open(path(seg_name(at)), os.O_RDWR | os.O_CREAT | os.O_TRUNC)
        sync_dir()
        os.close(self.fd)
        self.fd = new_fd
        if old != at:
            os.remove(path(seg_name(old)))
            sync_dir()
        self.file_base = at
        self.size = 0
        self.bases, self.nexts, self.poss, self.lens = [], [], [], []
        self.log_start = self.log_end = at

    def trim_epochs(self):
        """Drop epoch entries starting at or after the log end (persisted)."""
        kept = [(e, s) for (e, s) in self.epochs if s < self.log_end]
        if len(kept) != len(self.epochs):
            self.epochs = kept
            self.write_epochs()

    def write_epochs(self):
        lines = ["0", str(len(self.epochs))] + [f"{e} {s}" for (e, s) in self.epochs]
        write_atomic("leader-epochs", ("\n".join(lines) + "\n").encode())

    def out_of_range(self):
        return Refused(PluginError_OffsetOutOfRange(OffsetBounds(self.log_start, self.log_end)))

    # ---- the contract

    @boundary
    def append(self, batch):
        n = len(batch)
        if n == 0:
            raise invalid("append of zero bytes")
        # Check every header first: all or nothing.
        found = []
        at, expected = 0, self.log_end
        while at < n:
            base, length, count, _epoch = parse_header(batch, at, n - at)
            if base != expected:
                raise conflict(f"batch base offset {base} is not the log end offset {expected}")
            found.append((base, base + count, at, length))
            expected = base + count
            at += length
        start = self.size
        sync_now = self.fsync_mode == "always" or (
            self.fsync_mode == "interval" and time.monotonic() - self.last_sync >= self.fsync_interval
        )
        try:
            write_all(self.fd, batch, start)
            if sync_now:
                os.fsync(self.fd)
        except OSError as e:
            # Leave no partial batch behind.
            try:
                os.ftruncate(self.fd, start)
            except OSError:
                pass
            raise io_error("append", e)
        for base, nxt, rel, length in found:
            self.push(base, nxt, start + rel, length)
        self.size = start + n
        if sync_now:
            self.last_sync = time.monotonic()
            self.unsynced = False
        else:
            self.unsynced = True
        return self.log_end

    @boundary
    def read(self, offset, max_bytes):
        if offset < self.log_start or offset > self.log_end:
            raise self.out_of_range()
        if offset == self.log_end:
            return b""
        first = bisect.bisect_right(self.nexts, offset)
        if first >= len(self.bases) or self.bases[first] > offset:
            raise self.out_of_range()
        # Whole batches while the total stays within max_bytes; always one.
        total, last = 0, first
        for i in range(first, len(self.lens)):
            total += self.lens[i]
            if i > first and total > max_bytes:
                break
            last = i + 1
        # Batches are back to back in the file: one contiguous read.
        length = self.poss[last - 1] + self.lens[last - 1] - self.poss[first]
        return read_exact(self.fd, length, self.poss[first])

    def bounds(self):
        return OffsetBounds(self.log_start, self.log_end)

    @boundary
    def truncate(self, offset):
        if offset < self.log_start or offset > self.log_end:
            raise self.out_of_range()
        keep = bisect.bisect_right(self.nexts, offset)
        if keep < len(self.bases):
            cut_pos = self.poss[keep]
            self.log_end = self.bases[keep]
            del self.bases[keep:], self.nexts[keep:], self.poss[keep:], self.lens[keep:]
            # A truncation that a crash undid could resurrect divergent
            # batches: make it durable before answering.
            os.ftruncate(self.fd, cut_pos)
            os.fsync(self.fd)
            self.size = cut_pos
            if self.log_start > self.log_end:
                # The batch straddling the log start went: the start follows
                # the end down. Lowered only after the cut is durable, so a
                # crash in between cannot make deleted offsets readable.
                self.log_start = self.log_end
                write_atomic("log-start", f"{self.log_start}\n".encode())
        elif offset < self.log_end:
            # Only reachable when `offset` lies below every stored batch.
            self.log_end = max(offset, self.log_start)
        self.trim_epochs()
        return self.log_end

    @boundary
    def reset(self, offset):
        """Empty the log and restart it at `offset`, below the start too (a
        follower whose log lies wholly past its leader's end)."""
        self.epochs = []
        self.write_epochs()
        if offset >= self.log_end:
            # Past the end: the checkpoint first, as delete_prefix does.
            write_atomic("log-start", f"{offset}\n".encode())
            self.start_afresh(offset)
            return
        # Below the end the old file goes first, then the new start is
        # checkpointed: open keeps the highest-named file, so a new file
        # made first would lose to the old one after a crash.
        os.close(self.fd)
        os.remove(path(seg_name(self.file_base)))
        sync_dir()
        write_atomic("log-start", f"{offset}\n".encode())
        self.fd = os.open(path(seg_name(offset)), os.O_RDWR | os.O_CREAT | os.O_TRUNC)
        sync_dir()
        self.file_base = offset
        self.size = 0
        self.bases, self.nexts, self.poss, self.lens = [], [], [], []
        self.log_start = self.log_end = offset

    @boundary
    def delete_prefix(self, offset):
        if offset <= self.log_start:
            return
        # Checkpoint first: a crash before the bytes are gone then finishes
        # the job on open instead of handing out old offsets again.
        write_atomic("log-start", f"{offset}\n".encode())
        cut = bisect.bisect_right(self.nexts, offset)
        if cut >= len(self.bases):
            # Nothing left (or a reset past the end): start afresh there.
            self.start_afresh(max(self.log_end, offset))
            self.log_start = offset
            return
        del self.bases[:cut], self.nexts[:cut], self.poss[:cut], self.lens[:cut]
        self.log_start = offset
        dead = self.poss[0]
        if dead >= self.compact_bytes and dead >= self.size - dead:
            self.compact()

    def compact(self):
        """Copy the live batches into a new file named by the first one's
        base, then drop the old file: dead bytes are released."""
        new_base = self.bases[0]
        if new_base == self.file_base:
            return
        self.sync()
        dead = self.poss[0]
        tmp = path(seg_name(new_base) + ".tmp")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
        try:
            pos = dead
            while pos < self.size:
                chunk = read_exact(self.fd, min(self.size - pos, 1 << 20), pos)
                write_all(fd, chunk, pos - dead)
                pos += len(chunk)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        os.replace(tmp, path(seg_name(new_base)))
        sync_dir()
        os.close(self.fd)
        os.remove(path(seg_name(self.file_base)))
        sync_dir()
        self.fd = fd
        self.file_base = new_base
        self.size -= dead
        log(host.LogLevel.DEBUG, f"compacted the log: {dead} dead bytes released, now {seg_name(new_base)}")
        self.poss = [p - dead for p in self.poss]

    @boundary
    def high_watermark(self):
        return self.hw

    @boundary
    def set_high_watermark(self, offset):
        write_atomic("high-watermark", f"{offset}\n".encode())
        self.hw = offset

    @boundary
    def leader_epochs(self):
        return [EpochEntry(e, s) for (e, s) in self.epochs]

    @boundary
    def set_leader_epochs(self, entries):
        self.epochs = [(e.epoch, e.start_offset) for e in entries]
        self.write_epochs()

    @boundary
    def flush(self):
        self.sync()

    def sync(self):
        if self.unsynced:
            os.fsync(self.fd)
            self.unsynced = False
        self.last_sync = time.monotonic()
