/**
 * A Replicator storage plugin written in JavaScript (built with
 * componentize-js, which embeds the SpiderMonkey engine in the component).
 *
 * It owns the log of one partition, kept in the directory the host preopens
 * as `/data` (and nothing else: each partition gets its own instance). The
 * semantics mirror the Rust plugins (`plugins/sdk/src/index.rs`) and the
 * Python example (`examples/storage-python/app.py`) exactly.
 *
 * On-disk layout of `/data`:
 *
 * - `<base:020>.log`: the log, record batches back to back exactly as the
 *   host sent them. `base` is the offset of the first batch the file holds
 *   (or the log end, when it holds none). Normally there is exactly one such
 *   file; a compaction writes a new one under a higher base and then removes
 *   the old, so after a crash the highest base wins.
 * - `log-start`, `high-watermark`: decimal checkpoints.
 * - `leader-epochs`: Kafka's checkpoint text: `0`, the count, `epoch offset`
 *   lines.
 * - `*.tmp`: a checkpoint or compaction caught mid-write; removed on open.
 *
 * Every checkpoint is replaced atomically (temp file, fsync, rename), so a
 * crash leaves the old or the new one, never half of each.
 *
 * Recovery (in `open`) walks the log checking each batch's framing and that
 * offsets are contiguous, and checks CRC-32C for the batches in the last
 * `CRC_TAIL` bytes, where a torn write can be. The first bad batch and
 * everything after it are cut off the file.
 *
 * Every append is written to the file before it returns (so a crash of the
 * node process loses nothing the OS took, as with the built-in `file`
 * plugin: only a power loss can, for data not yet synced). Appends may
 * instead be buffered in memory (`write.buffer.bytes`, default 0: off) and
 * written to the file in one call: every wasi:filesystem call costs tens of
 * microseconds, more than copying a small batch. Reads see the buffer too.
 * The buffer is written out when it fills, on every fsync (so at least once
 * per `fsync.interval.ms` while appends come in), at every high-watermark
 * checkpoint (the host writes one within 5 s of a change, so an idle
 * partition's buffer does not linger), on `flush` and when the host closes
 * the log. A crash of the node process then loses the buffer: a tail that
 * replication refills from another replica, but acknowledged writes if every
 * replica's process dies at once, which is why it is off by default.
 *
 * The index (base offset -> file position and length) lives in memory in
 * typed arrays (28 bytes per batch), so a read is a bisection plus one
 * positional read.
 *
 * JS notes for plugin authors:
 * - WIT u64 values (offsets) arrive and leave as BigInt; u32 as Number. All
 *   offsets here are BigInt (`123n`), file positions and lengths Numbers.
 * - A method answers `err(e)` by *throwing* a plain `{ tag, val }` object
 *   (the `Refused` class below). Throwing an `Error` traps: the host treats
 *   that as a fault, drops the instance and opens a fresh one, which is the
 *   right answer to a bug.
 * - WASI calls that fail throw an `Error` with a `payload` (the
 *   wasi:filesystem error code, e.g. `no-entry`). `boundary` turns those into
 *   `io` errors.
 * - The module's top level runs at *build* time (componentize-js snapshots
 *   the initialised engine with Wizer), so nothing here touches the file
 *   system or the host before `open` is called.
 */

import { log as hostLog } from 'replicator:plugin/host@0.1.0';
import { getDirectories } from 'wasi:filesystem/preopens@0.2.12';

const DATA = '/data';
const HEADER_LEN = 44;
const MAGIC = 1;
const MAX_BATCH_LEN = 16 * 1024 * 1024;
const U64_MAX = (1n << 64n) - 1n;
// Batches ending in the last CRC_TAIL bytes of the log get their CRC checked
// on open (a torn write is always at the tail). CRC-32C in JS runs at about
// 6 MB/s in the component (SpiderMonkey is an interpreter there), so checking
// a log of 1 GB would blow the host's 120 s open deadline. Earlier batches still get framing and
// contiguity checks (and the host checks every CRC on read).
const CRC_TAIL = 4 * 1024 * 1024;
// Compact the log file on delete-prefix once this many dead bytes lead it
// (and they outnumber the live ones): a rewrite costs a copy of the live
// data. The `compact.bytes` setting overrides it (tests use a small one).
const COMPACT_MIN = 8 * 1024 * 1024;
// Appended bytes held in memory before one write to the file: by default
// none (see the header comment for why).
const WRITE_BUFFER = 0;
// Bytes asked for per read call. Replicator's host answers up to 1 MiB,
// wasmtime-wasi's own read at most 64 KiB; a short read is read on.
const READ_CHUNK = 1024 * 1024;
// Bytes of log read at a time while scanning on open.
const SCAN_WINDOW = 1024 * 1024;

// componentize-js releases imported resources (file descriptors) when
// garbage collected; calling this method releases one at once.
const dispose = Symbol.dispose || Symbol.for('dispose');

// ---------------------------------------------------------------- CRC-32C

// Slicing-by-8: eight 256-entry tables, so the loop consumes 8 bytes per
// round. In the interpreted engine this is ~1.4x the speed of the classic
// byte-at-a-time loop (about 6.5 MB/s against 4.8 MB/s).
const CRC_TABLES = (() => {
  const poly = 0x82f63b78; // Castagnoli, reflected
  const t = new Uint32Array(8 * 256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? (c >>> 1) ^ poly : c >>> 1;
    t[n] = c >>> 0;
  }
  for (let n = 0; n < 256; n++) {
    for (let k = 1; k < 8; k++) {
      const prev = t[(k - 1) * 256 + n];
      t[k * 256 + n] = (prev >>> 8) ^ t[prev & 0xff];
    }
  }
  return t;
})();

/** CRC-32C of bytes[start:end]. */
function crc32c(bytes, start, end) {
  const t = CRC_TABLES;
  let crc = 0xffffffff;
  let i = start;
  for (; i + 8 <= end; i += 8) {
    const lo = crc ^ (bytes[i] | (bytes[i + 1] << 8) | (bytes[i + 2] << 16) | (bytes[i + 3] << 24));
    crc =
      t[1792 + (lo & 0xff)] ^
      t[1536 + ((lo >>> 8) & 0xff)] ^
      t[1280 + ((lo >>> 16) & 0xff)] ^
      t[1024 + (lo >>> 24)] ^
      t[768 + bytes[i + 4]] ^
      t[512 + bytes[i + 5]] ^
      t[256 + bytes[i + 6]] ^
      t[bytes[i + 7]];
  }
  for (; i < end; i++) crc = t[(crc ^ bytes[i]) & 0xff] ^ (crc >>> 8);
  return (crc ^ 0xffffffff) >>> 0;
}

// ---------------------------------------------------------------- errors

/** An expected failure: thrown, it becomes the WIT `plugin-error` the
 * method returns (`{ tag: 'conflict', val: '...' }` and so on). */
class Refused {
  constructor(tag, val) {
    this.tag = tag;
    this.val = val;
  }
}

const invalid = (msg) => new Refused('invalid-input', msg);
const conflict = (msg) => new Refused('conflict', msg);
const corrupt = (msg) => new Refused('corrupt', msg);

/** A failed WASI call: componentize-js throws an Error whose `payload` is
 * the wasi:filesystem `error-code` (a string such as `no-entry`). */
function fsErrorCode(e) {
  return e !== null && typeof e === 'object' && typeof e.payload === 'string' ? e.payload : null;
}

/** Wrap a method so that expected failures leave it as WIT errors: a
 * `Refused` as itself, a failed file operation as `io`. Anything else is a
 * bug and is left to trap, so the host drops this instance and opens a fresh
 * one instead of trusting a half-updated state. */
function boundary(name, fn) {
  return function (...args) {
    try {
      return fn.apply(this, args);
    } catch (e) {
      if (e instanceof Refused) throw e;
      const code = fsErrorCode(e);
      if (code !== null) throw new Refused('io', `${name}: ${code}`);
      throw e;
    }
  };
}

function log(level, msg) {
  hostLog(level, msg);
}

// ---------------------------------------------------------------- batches

/** {base, length, count, epoch} of the batch at view[at:], checking what the
 * SDK's `BatchHeader::parse` checks; throws `invalid-input` otherwise.
 * `have` is how many bytes of the batch are available from `at`. */
function parseHeader(view, at, have) {
  if (have < HEADER_LEN) throw invalid(`batch truncated: needs ${HEADER_LEN} bytes, have ${have}`);
  const base = view.getBigUint64(at, true);
  const length = view.getUint32(at + 8, true);
  const magic = view.getUint8(at + 16);
  const epoch = view.getUint32(at + 20, true);
  const count = view.getUint32(at + 24, true);
  if (length < HEADER_LEN || length > MAX_BATCH_LEN) {
    throw invalid(`batch length ${length} outside ${HEADER_LEN}..=${MAX_BATCH_LEN}`);
  }
  if (magic !== MAGIC) throw invalid(`unknown batch format version ${magic}`);
  if (count === 0) throw invalid('batch holds no records');
  if (base + BigInt(count) > U64_MAX) throw invalid('batch offsets overflow u64');
  if (have < length) throw invalid(`batch truncated: needs ${length} bytes, have ${have}`);
  return { base, length, count: BigInt(count), epoch };
}

function crcOk(bytes, view, at, length) {
  return crc32c(bytes, at + 16, at + length) === view.getUint32(at + 12, true);
}

function viewOf(bytes) {
  return new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
}

// ---------------------------------------------------------------- the index

/** Batches of the log in offset order, as four parallel typed arrays: base
 * offset, next offset (base + record count), byte position in the log file
 * and length. Entries [head, tail) are live; a prefix delete only moves
 * `head`, and the space is reclaimed when the arrays next grow. */
class Index {
  constructor() {
    this.clear();
  }

  clear() {
    this.cap = 256;
    this.bases = new BigUint64Array(this.cap);
    this.nexts = new BigUint64Array(this.cap);
    this.poss = new Float64Array(this.cap); // exact for positions < 2^53
    this.lens = new Uint32Array(this.cap);
    this.head = 0;
    this.tail = 0;
  }

  get length() {
    return this.tail - this.head;
  }
  base(i) {
    return this.bases[this.head + i];
  }
  next(i) {
    return this.nexts[this.head + i];
  }
  pos(i) {
    return this.poss[this.head + i];
  }
  len(i) {
    return this.lens[this.head + i];
  }

  push(base, next, pos, len) {
    if (this.tail === this.cap) this.grow();
    const t = this.tail++;
    this.bases[t] = base;
    this.nexts[t] = next;
    this.poss[t] = pos;
    this.lens[t] = len;
  }

  grow() {
    const n = this.length;
    // Reuse the slots a prefix delete freed; double only when mostly live.
    const cap = n * 2 > this.cap ? this.cap * 2 : this.cap;
    const move = (old, Kind) => {
      const a = new Kind(cap);
      a.set(old.subarray(this.head, this.tail));
      return a;
    };
    this.bases = move(this.bases, BigUint64Array);
    this.nexts = move(this.nexts, BigUint64Array);
    this.poss = move(this.poss, Float64Array);
    this.lens = move(this.lens, Uint32Array);
    this.cap = cap;
    this.head = 0;
    this.tail = n;
  }

  /** How many entries end at or before `offset` (Python's
   * `bisect_right(nexts, offset)`): the index of the batch holding it. */
  countEndingBy(offset) {
    let lo = this.head;
    let hi = this.tail;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (this.nexts[mid] <= offset) lo = mid + 1;
      else hi = mid;
    }
    return lo - this.head;
  }

  /** Keep the first `k` entries. */
  keepFirst(k) {
    this.tail = this.head + k;
  }

  /** Drop the first `k` entries. */
  dropFirst(k) {
    this.head += k;
  }

  /** Every position moves down by `delta` (after a compaction). */
  shiftPositions(delta) {
    for (let i = this.head; i < this.tail; i++) this.poss[i] -= delta;
  }
}

// ---------------------------------------------------------------- files

let dataDir = null;

/** The preopened `/data` directory (looked up on first use: never at build
 * time, when the top level of this module runs). */
function dir() {
  if (dataDir === null) {
    for (const [d, p] of getDirectories()) {
      if (p === DATA) dataDir = d;
      else d[dispose]();
    }
    if (dataDir === null) throw new Refused('io', `no ${DATA} directory was preopened`);
  }
  return dataDir;
}

function segName(base) {
  return `${base.toString().padStart(20, '0')}.log`;
}

function openFile(name, { create = false, truncate = false, write = true } = {}) {
  return dir().openAt({}, name, { create, truncate }, { read: true, write });
}

/** Positional write of all of `data` (one call in the common case; the host
 * takes at most 4 MiB per call). */
function writeAll(fd, data, pos) {
  let view = data;
  while (view.length > 0) {
    const n = Number(fd.write(view, BigInt(pos)));
    if (n <= 0) throw new Refused('io', `write at byte ${pos} made no progress`);
    view = view.subarray(n);
    pos += n;
  }
}

/** `length` bytes from `pos`, in as many reads as the host needs. */
function readExact(fd, length, pos) {
  const out = new Uint8Array(length);
  let got = 0;
  while (got < length) {
    const [chunk] = fd.read(BigInt(Math.min(length - got, READ_CHUNK)), BigInt(pos + got));
    if (chunk.length === 0) throw corrupt(`log ends early at byte ${pos + got}`);
    out.set(chunk, got);
    got += chunk.length;
  }
  return out;
}

function syncDir() {
  // Not every WASI host lets a directory be synced; the renames it would
  // order are still atomic, so a failure here is not an error.
  try {
    dir().sync();
  } catch (e) {
    if (fsErrorCode(e) === null) throw e;
  }
}

function removeFile(name) {
  dir().unlinkFileAt(name);
}

function listDir() {
  const stream = dir().readDirectory();
  const names = [];
  try {
    for (let e = stream.readDirectoryEntry(); e != null; e = stream.readDirectoryEntry()) {
      names.push(e.name);
    }
  } finally {
    stream[dispose]();
  }
  return names;
}

const encoder = new TextEncoder();
const decoder = new TextDecoder();

/** Replace `name` atomically: write a temp file, sync it, rename it over. */
function writeAtomic(name, text) {
  const tmp = `${name}.tmp`;
  const fd = openFile(tmp, { create: true, truncate: true });
  try {
    writeAll(fd, encoder.encode(text), 0);
    fd.sync();
  } finally {
    fd[dispose]();
  }
  dir().renameAt(tmp, dir(), name);
  syncDir();
}

/** The whole content of a small file, or null when it does not exist. */
function readSmall(name) {
  let fd;
  try {
    fd = dir().openAt({}, name, {}, { read: true });
  } catch (e) {
    if (fsErrorCode(e) === 'no-entry') return null;
    throw e;
  }
  try {
    return readExact(fd, Number(fd.stat().size), 0);
  } finally {
    fd[dispose]();
  }
}

function parseU64(data, name) {
  const s = decoder.decode(data).trim();
  if (!/^[0-9]{1,20}$/.test(s)) throw corrupt(`checkpoint \`${name}\` is not a number`);
  const v = BigInt(s);
  if (v > U64_MAX) throw corrupt(`checkpoint \`${name}\` is out of range`);
  return v;
}

function parseEpochs(data) {
  const bad = corrupt('checkpoint `leader-epochs` is malformed');
  const lines = decoder.decode(data).split('\n');
  if (lines[lines.length - 1] === '') lines.pop();
  if (lines.length < 2 || lines[0] !== '0' || !/^[0-9]+$/.test(lines[1])) throw bad;
  const out = [];
  for (const line of lines.slice(2)) {
    const m = /^([0-9]{1,10}) ([0-9]{1,20})$/.exec(line);
    if (!m) throw bad;
    const epoch = Number(m[1]);
    const startOffset = BigInt(m[2]);
    // Out of the WIT types' range would trap on the way out.
    if (epoch > 0xffffffff || startOffset > U64_MAX) throw bad;
    out.push({ epoch, startOffset });
  }
  if (out.length !== Number(lines[1])) throw bad;
  return out;
}

/** Settings from `fsync` = always|interval|never, `fsync.interval.ms`,
 * `compact.bytes` and `write.buffer.bytes`; unknown keys are refused like
 * the Rust plugins do. */
function parseConfig(pairs) {
  const cfg = {
    fsync: 'interval',
    intervalMs: 1000,
    compactBytes: COMPACT_MIN,
    bufferBytes: WRITE_BUFFER,
  };
  const number = (k, v, max, want) => {
    if (!/^[0-9]+$/.test(v) || Number(v) > max) throw invalid(`${k} = \`${v}\`: want ${want}`);
    return Number(v);
  };
  for (const [k, v] of pairs) {
    if (k === 'fsync') {
      if (!['always', 'interval', 'never'].includes(v)) {
        throw invalid(`fsync = \`${v}\`: want always, interval or never`);
      }
      cfg.fsync = v;
    } else if (k === 'fsync.interval.ms') {
      cfg.intervalMs = number(k, v, 86_400_000, 'milliseconds from 0 to 86400000');
    } else if (k === 'compact.bytes') {
      cfg.compactBytes = number(k, v, 2 ** 40, 'a byte count from 0 to 2^40');
    } else if (k === 'write.buffer.bytes') {
      cfg.bufferBytes = number(k, v, 64 * 1024 * 1024, 'a byte count from 0 to 67108864');
    } else {
      throw invalid(
        `unknown setting \`${k}\`; storage-js takes fsync (always|interval|never), ` +
          'fsync.interval.ms, compact.bytes, write.buffer.bytes',
      );
    }
  }
  return cfg;
}

// ---------------------------------------------------------------- the log

/**
 * One partition's log: the open log file, the write buffer and the index.
 *
 * Index invariants (as in the SDK's OffsetIndex): entries are contiguous
 * (`next(i) == base(i + 1)`), `fileBase <= base(0) <= logStart` (the start
 * may fall inside the first batch), `next(last) == logEnd` when there are
 * entries, and `logStart <= logEnd`. `pos(i)` is the batch's byte position in
 * the log file and `len(i)` its length; batches are back to back, so
 * `pos(i + 1) == pos(i) + len(i)`.
 *
 * Bytes [0, written) of the log are in the file; bytes [written, size) are
 * still in `pend` (the write buffer), at pend[0 .. size - written). Bytes
 * [0, synced) were in the file at its last successful fsync.
 */
class PartitionLog {
  constructor(cfg) {
    this.cfg = cfg;
    this.fd = null;
    this.fileBase = 0n;
    this.size = 0;
    this.written = 0;
    this.synced = 0;
    this.pend = new Uint8Array(Math.max(cfg.bufferBytes, 4096));
    this.index = new Index();
    this.logStart = 0n;
    this.logEnd = 0n;
    this.hw = 0n;
    this.epochs = []; // [{ epoch, startOffset }]
    this.unsynced = false;
    this.lastSync = performance.now();
  }

  // ---- open and recovery

  static open(topic, partition, config) {
    const log_ = new PartitionLog(parseConfig(config));
    log_.recover();
    return log_;
  }

  recover() {
    const bases = [];
    for (const name of listDir()) {
      if (name.endsWith('.tmp')) removeFile(name);
      else if (/^[0-9]{20}\.log$/.test(name)) bases.push(BigInt(name.slice(0, 20)));
    }
    bases.sort((a, b) => (a < b ? -1 : a > b ? 1 : 0));
    // Older files are leftovers of a compaction or reset that crashed after
    // the new file was in place: the newest is complete.
    for (const b of bases.slice(0, -1)) removeFile(segName(b));
    let startCkpt = null;
    const data = readSmall('log-start');
    if (data !== null) startCkpt = parseU64(data, 'log-start');
    this.fileBase = bases.length > 0 ? bases[bases.length - 1] : (startCkpt ?? 0n);
    this.fd = openFile(segName(this.fileBase), { create: true });
    this.logStart = this.logEnd = this.fileBase;
    this.scan();
    if (startCkpt !== null && startCkpt > this.logEnd) {
      // A reset past the end was checkpointed but the crash came before the
      // new file was made: finish it.
      log('info', `completing an interrupted reset to offset ${startCkpt}`);
      this.startAfresh(startCkpt);
    }
    if (startCkpt !== null) {
      const s = startCkpt > this.logStart ? startCkpt : this.logStart;
      this.logStart = s < this.logEnd ? s : this.logEnd;
    }
    const hw = readSmall('high-watermark');
    if (hw !== null) this.hw = parseU64(hw, 'high-watermark');
    const epochs = readSmall('leader-epochs');
    if (epochs !== null) this.epochs = parseEpochs(epochs);
    this.trimEpochs();
  }

  /** Index the log file's whole batches and cut whatever follows the last
   * good one (a torn write, or garbage). */
  scan() {
    const fd = this.fd;
    const fileSize = Number(fd.stat().size);
    const crcFrom = Math.max(0, fileSize - CRC_TAIL);
    let pos = 0;
    let expected = this.fileBase;
    // Headers are read through a window of SCAN_WINDOW bytes: a few host
    // calls per window instead of one per batch.
    let win = new Uint8Array(0);
    let view = viewOf(win);
    let wstart = 0;
    const load = (from, len) => {
      win = readExact(fd, len, from);
      view = viewOf(win);
      wstart = from;
    };
    while (pos < fileSize) {
      const avail = fileSize - pos;
      if (avail < HEADER_LEN) break;
      if (pos + HEADER_LEN > wstart + win.length) load(pos, Math.min(SCAN_WINDOW, avail));
      let h;
      try {
        // `avail` as the batch's bytes: a batch longer than what is left of
        // the file is a torn write.
        h = parseHeader(view, pos - wstart, avail);
      } catch (e) {
        if (e instanceof Refused) break;
        throw e;
      }
      if (h.base !== expected) break;
      if (pos + h.length > crcFrom) {
        if (pos + h.length > wstart + win.length) {
          load(pos, Math.min(Math.max(SCAN_WINDOW, h.length), avail));
        }
        if (!crcOk(win, view, pos - wstart, h.length)) break;
      }
      this.index.push(h.base, h.base + h.count, pos, h.length);
      this.logEnd = h.base + h.count;
      expected = this.logEnd;
      pos += h.length;
    }
    if (pos < fileSize) {
      log(
        'warn',
        `cut ${fileSize - pos} torn or corrupt bytes from ${segName(this.fileBase)} at position ${pos}`,
      );
      fd.setSize(BigInt(pos));
      fd.sync();
    }
    this.size = this.written = this.synced = pos;
  }

  /** Make the log empty at offset `at`: a fresh file named `at`, then the
   * old one removed (a crash in between leaves both; open keeps the newer). */
  startAfresh(at) {
    const old = this.fileBase;
    const fd = openFile(segName(at), { create: true, truncate: true });
    syncDir();
    this.fd[dispose]();
    this.fd = fd;
    if (old !== at) {
      removeFile(segName(old));
      syncDir();
    }
    this.emptyAt(at);
  }

  /** In-memory state of an empty log file based at `at`. */
  emptyAt(at) {
    this.fileBase = at;
    this.size = this.written = this.synced = 0;
    this.index.clear();
    this.logStart = this.logEnd = at;
    this.unsynced = false;
  }

  trimEpochs() {
    // Drop epoch entries starting at or after the log end (persisted).
    const kept = this.epochs.filter((e) => e.startOffset < this.logEnd);
    if (kept.length !== this.epochs.length) {
      this.epochs = kept;
      this.writeEpochs();
    }
  }

  writeEpochs() {
    const lines = ['0', String(this.epochs.length)];
    for (const e of this.epochs) lines.push(`${e.epoch} ${e.startOffset}`);
    writeAtomic('leader-epochs', lines.join('\n') + '\n');
  }

  outOfRange() {
    return new Refused('offset-out-of-range', { logStart: this.logStart, logEnd: this.logEnd });
  }

  // ---- the write buffer

  /** Add whole batches to the write buffer. */
  buffer(bytes) {
    const have = this.size - this.written;
    const need = have + bytes.length;
    if (need > this.pend.length) {
      const bigger = new Uint8Array(Math.max(need, this.pend.length * 2));
      bigger.set(this.pend.subarray(0, have));
      this.pend = bigger;
    }
    this.pend.set(bytes, have);
    this.size += bytes.length;
  }

  /** Write the buffer to the file. On failure what did land stays counted
   * in `written` and the rest stays buffered. */
  writeOut() {
    const n = this.size - this.written;
    if (n === 0) return;
    let done = 0;
    try {
      while (done < n) {
        const k = Number(this.fd.write(this.pend.subarray(done, n), BigInt(this.written)));
        if (k <= 0) throw new Refused('io', `write at byte ${this.written} made no progress`);
        done += k;
        this.written += k;
      }
    } finally {
      if (done > 0 && done < n) this.pend.copyWithin(0, done, n);
    }
    this.unsynced = true;
    // A big append grew the buffer: give the memory back.
    if (this.pend.length > 4 * Math.max(this.cfg.bufferBytes, 4096)) {
      this.pend = new Uint8Array(Math.max(this.cfg.bufferBytes, 4096));
    }
  }

  /** Bytes [pos, pos + length) of the log, from the file and the buffer. */
  readRange(pos, length) {
    const end = pos + length;
    if (end <= this.written) return readExact(this.fd, length, pos);
    if (pos >= this.written) {
      return this.pend.slice(pos - this.written, end - this.written);
    }
    const out = new Uint8Array(length);
    out.set(readExact(this.fd, this.written - pos, pos), 0);
    out.set(this.pend.subarray(0, end - this.written), this.written - pos);
    return out;
  }

  /** After a failed write or sync: cut the log back to the last batch that
   * ends at or before `pos`, in memory and in the file, and drop the buffer.
   * The host asks for the bounds after an `io` answer and refetches the lost
   * tail. A failure to cut the file leaves its state unknown: that traps. */
  cutBackTo(pos) {
    const idx = this.index;
    let k = idx.length;
    while (k > 0 && idx.pos(k - 1) + idx.len(k - 1) > pos) k--;
    if (k < idx.length) {
      const cut = idx.pos(k);
      this.logEnd = idx.base(k);
      if (this.logStart > this.logEnd) this.logStart = this.logEnd;
      idx.keepFirst(k);
      this.size = cut;
    }
    if (this.written > this.size) {
      try {
        this.fd.setSize(BigInt(this.size));
      } catch (e) {
        throw new Error(`cannot cut the log back to byte ${this.size} after a failed write: ${fsErrorCode(e) ?? e}`);
      }
      this.written = this.size;
      if (this.synced > this.size) this.synced = this.size;
    }
  }

  // ---- the contract

  append(batch) {
    const n = batch.length;
    if (n === 0) throw invalid('append of zero bytes');
    // Check every header first: all or nothing.
    const view = viewOf(batch);
    const found = [];
    let at = 0;
    let expected = this.logEnd;
    while (at < n) {
      const h = parseHeader(view, at, n - at);
      if (h.base !== expected) {
        throw conflict(`batch base offset ${h.base} is not the log end offset ${expected}`);
      }
      found.push([h.base, h.base + h.count, at, h.length]);
      expected = h.base + h.count;
      at += h.length;
    }
    const start = this.size;
    this.buffer(batch);
    for (const [base, next, rel, length] of found) this.index.push(base, next, start + rel, length);
    this.logEnd = expected;
    const mode = this.cfg.fsync;
    const syncNow =
      mode === 'always' || (mode === 'interval' && performance.now() - this.lastSync >= this.cfg.intervalMs);
    if (syncNow || this.size - this.written >= this.cfg.bufferBytes) {
      try {
        this.writeOut();
        if (syncNow) this.sync();
      } catch (e) {
        const code = fsErrorCode(e);
        if (code === null && !(e instanceof Refused)) throw e;
        // Leave no partial batch behind (and nothing the file lacks).
        this.cutBackTo(Math.min(start, this.written));
        throw new Refused('io', `append: ${code ?? e.val}`);
      }
    }
    return this.logEnd;
  }

  read(offset, maxBytes) {
    if (offset < this.logStart || offset > this.logEnd) throw this.outOfRange();
    if (offset === this.logEnd) return new Uint8Array(0);
    const idx = this.index;
    const first = idx.countEndingBy(offset);
    if (first >= idx.length || idx.base(first) > offset) throw this.outOfRange();
    // Whole batches while the total stays within maxBytes; always one.
    let total = 0;
    let last = first;
    for (let i = first; i < idx.length; i++) {
      total += idx.len(i);
      if (i > first && total > maxBytes) break;
      last = i + 1;
    }
    // Batches are back to back in the file: one contiguous range.
    const from = idx.pos(first);
    return this.readRange(from, idx.pos(last - 1) + idx.len(last - 1) - from);
  }

  bounds() {
    return { logStart: this.logStart, logEnd: this.logEnd };
  }

  truncate(offset) {
    if (offset < this.logStart || offset > this.logEnd) throw this.outOfRange();
    const idx = this.index;
    const keep = idx.countEndingBy(offset);
    if (keep < idx.length) {
      const cutPos = idx.pos(keep);
      this.logEnd = idx.base(keep);
      idx.keepFirst(keep);
      if (cutPos >= this.written) {
        // Only buffered bytes go: the file never held them.
        this.size = cutPos;
      } else {
        // A truncation that a crash undid could resurrect divergent batches:
        // make it durable before answering.
        this.size = this.written = cutPos;
        if (this.synced > cutPos) this.synced = cutPos;
        this.fd.setSize(BigInt(cutPos));
        this.fd.sync();
      }
      if (this.logStart > this.logEnd) {
        // The batch straddling the log start went: the start follows the end
        // down. Lowered only after the cut is durable, so a crash in between
        // cannot make deleted offsets readable.
        this.logStart = this.logEnd;
        writeAtomic('log-start', `${this.logStart}\n`);
      }
    } else if (offset < this.logEnd) {
      // Only reachable when `offset` lies below every stored batch.
      this.logEnd = offset > this.logStart ? offset : this.logStart;
    }
    this.trimEpochs();
    return this.logEnd;
  }

  /** Empty the log and restart it at `offset`, below the start too (a
   * follower whose log lies wholly past its leader's end). */
  reset(offset) {
    this.epochs = [];
    this.writeEpochs();
    if (offset >= this.logEnd) {
      // Past the end: the checkpoint first, as deletePrefix does.
      writeAtomic('log-start', `${offset}\n`);
      this.startAfresh(offset);
      return;
    }
    // Below the end the old file goes first, then the new start is
    // checkpointed: open keeps the highest-named file, so a new file made
    // first would lose to the old one after a crash.
    this.fd[dispose]();
    this.fd = null;
    removeFile(segName(this.fileBase));
    syncDir();
    writeAtomic('log-start', `${offset}\n`);
    this.fd = openFile(segName(offset), { create: true, truncate: true });
    syncDir();
    this.emptyAt(offset);
  }

  deletePrefix(offset) {
    if (offset <= this.logStart) return;
    // Checkpoint first: a crash before the bytes are gone then finishes the
    // job on open instead of handing out old offsets again.
    writeAtomic('log-start', `${offset}\n`);
    const idx = this.index;
    const cut = idx.countEndingBy(offset);
    if (cut >= idx.length) {
      // Nothing left (or a reset past the end): start afresh there.
      this.startAfresh(this.logEnd > offset ? this.logEnd : offset);
      this.logStart = offset;
      return;
    }
    idx.dropFirst(cut);
    this.logStart = offset;
    const dead = idx.pos(0);
    if (dead >= this.cfg.compactBytes && dead >= this.size - dead) this.compact();
  }

  /** Copy the live batches into a new file named by the first one's base,
   * then drop the old file: dead bytes are released. */
  compact() {
    const newBase = this.index.base(0);
    if (newBase === this.fileBase) return;
    this.sync();
    const dead = this.index.pos(0);
    const tmp = `${segName(newBase)}.tmp`;
    const fd = openFile(tmp, { create: true, truncate: true });
    try {
      for (let pos = dead; pos < this.size; ) {
        const chunk = readExact(this.fd, Math.min(this.size - pos, 1 << 20), pos);
        writeAll(fd, chunk, pos - dead);
        pos += chunk.length;
      }
      fd.sync();
    } catch (e) {
      fd[dispose]();
      throw e;
    }
    dir().renameAt(tmp, dir(), segName(newBase));
    syncDir();
    this.fd[dispose]();
    removeFile(segName(this.fileBase));
    syncDir();
    this.fd = fd;
    this.fileBase = newBase;
    this.size -= dead;
    this.written -= dead;
    this.synced = this.written;
    this.index.shiftPositions(dead);
    log('debug', `compacted the log: ${dead} dead bytes released, now ${segName(newBase)}`);
  }

  highWatermark() {
    return this.hw;
  }

  setHighWatermark(offset) {
    // The host checkpoints the high watermark every few seconds (5 s by
    // default) while a partition changes, and it calls `flush` only at
    // shutdown: this is the call that hands the write buffer of a partition
    // that went idle to the OS, so a crash of the node cannot lose it. Best
    // effort: a failed write stays buffered, and the next append or flush
    // retries it and reports the failure.
    try {
      this.writeOut();
    } catch (e) {
      if (fsErrorCode(e) === null && !(e instanceof Refused)) throw e;
      log('warn', `writing the buffer out: ${fsErrorCode(e) ?? e.val}`);
    }
    writeAtomic('high-watermark', `${offset}\n`);
    this.hw = offset;
  }

  leaderEpochs() {
    return this.epochs;
  }

  setLeaderEpochs(entries) {
    this.epochs = entries.map((e) => ({ epoch: e.epoch, startOffset: e.startOffset }));
    this.writeEpochs();
  }

  flush() {
    try {
      this.writeOut();
    } catch (e) {
      if (fsErrorCode(e) === null && !(e instanceof Refused)) throw e;
      this.cutBackTo(this.written);
      throw e;
    }
    this.sync();
  }

  sync() {
    this.writeOut();
    if (this.unsynced) {
      try {
        this.fd.sync();
      } catch (e) {
        const code = fsErrorCode(e);
        if (code === null) throw e;
        // Linux reports a failed writeback once and keeps the pages: a
        // second fsync would succeed and vouch for bytes that may never
        // reach the disk. Cut back to what the last good fsync covered;
        // the host asks for the bounds after `io` and fetches the rest
        // again.
        this.cutBackTo(this.synced);
        this.unsynced = false;
        throw new Refused('io', `fsync failed (${code}); the log is cut back to its last synced batch`);
      }
      this.synced = this.written;
      this.unsynced = false;
    }
    this.lastSync = performance.now();
  }

  /** The host dropped the log (a clean close): write the buffer out, and
   * sync it unless told never to. Errors can only be logged here. */
  [dispose]() {
    if (this.fd === null) return;
    try {
      this.writeOut();
      if (this.cfg.fsync !== 'never') this.sync();
    } catch (e) {
      log('warn', `closing the log: ${fsErrorCode(e) ?? e?.val ?? e}`);
    }
    this.fd[dispose]();
    this.fd = null;
  }
}

// Expected failures of every method leave as WIT errors (see `boundary`).
for (const name of [
  'append',
  'read',
  'truncate',
  'reset',
  'deletePrefix',
  'highWatermark',
  'setHighWatermark',
  'leaderEpochs',
  'setLeaderEpochs',
  'flush',
]) {
  PartitionLog.prototype[name] = boundary(name, PartitionLog.prototype[name]);
}
PartitionLog.open = boundary('open', PartitionLog.open);

// The export of `replicator:plugin/storage`: componentize-js looks up the
// class of the `partition-log` resource here, under its name in camel case.
export const storage = { PartitionLog };
