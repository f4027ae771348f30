//! One partition's log in an object store: appends are buffered and
//! uploaded as immutable segment objects, recovery rebuilds the log from
//! a listing, and writer generations fence a second writer.
//!
//! Durability: an append lands in the buffer. The buffer is uploaded as
//! one segment before an append that would grow it past `segment.bytes`
//! or that comes `upload.interval.ms` after the buffer's first batch, on
//! `flush`, and before every checkpoint (so a persisted high watermark
//! never runs ahead of persisted data). Replication covers the rest, as
//! Kafka's unflushed page cache does.
//!
//! Fencing (see `layout.rs` for the names): opening first creates the
//! next generation's fence with `If-None-Match: *`, so two openers never
//! share one. After every write the writer lists the fences above its
//! own; if there is one, it is fenced and its write is reported failed.
//! Since the opener fences before it lists, any write an older generation
//! reported successful (its check ran before the fence existed) is in the
//! listing. The opener then writes its manifest, checks it was not fenced
//! meanwhile, and only then collects garbage. Truncating data that may
//! have been uploaded also takes a new generation, whose manifest says
//! exactly which older segments still count and where they are cut:
//! nothing is ever rewritten in place.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::rc::Rc;
use std::time::Instant;

use replicator_plugin_sdk::index::{self, AppendError, Entry, OffsetIndex};
use replicator_plugin_sdk::{BatchHeader, verify_crc};

use crate::config::Config;
use crate::layout::{self, Checkpoint, Claim, Kept, Name};
use crate::s3;

pub enum Error {
    Conflict(String),
    Invalid(String),
    OutOfRange,
    Io(String),
    Corrupt(String),
    Unavailable(String),
    /// Credentials, bucket or destination refused: a configuration error.
    Refused(String),
    /// A newer writer owns this partition's objects; reopen.
    Fenced(String),
}

impl From<s3::Error> for Error {
    fn from(e: s3::Error) -> Self {
        match e {
            s3::Error::Unavailable(m) => Error::Unavailable(m),
            s3::Error::Refused(m) => Error::Refused(m),
            s3::Error::Exists => Error::Conflict("the object already exists".into()),
            s3::Error::Other(m) => Error::Io(m),
        }
    }
}

impl From<AppendError> for Error {
    fn from(e: AppendError) -> Self {
        match e {
            AppendError::NotContiguous { .. } => Error::Conflict(e.to_string()),
            _ => Error::Invalid(e.to_string()),
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Loc {
    /// In the upload buffer, at this position.
    Buffer(usize),
    /// In the segment object starting at `base`, at `pos`.
    Object { base: u64, pos: usize },
}

/// An uploaded segment that counts, valid below `end`.
#[derive(Debug, Clone, Copy)]
struct Segment {
    gen_: u64,
    end: u64,
}

pub struct S3Log {
    client: s3::Client,
    /// The partition's key prefix.
    p: String,
    gen_: u64,
    segment_bytes: u64,
    upload_interval: std::time::Duration,
    cache_limit: u64,
    index: OffsetIndex<Loc>,
    segments: BTreeMap<u64, Segment>,
    /// Batches not uploaded yet, from `buffer_base` to the log end.
    buffer: Vec<u8>,
    /// Where each buffered batch ends: (byte length of the buffer up to
    /// and including it, next offset). Kept apart from the index, which
    /// forgets batches below the log start.
    buffer_marks: VecDeque<(usize, u64)>,
    buffer_base: u64,
    buffer_since: Option<Instant>,
    /// Highest offset an upload may have stored, even if it reported
    /// failure; truncating below it needs a new generation.
    maybe_uploaded_end: u64,
    hw: u64,
    epochs: Vec<(u32, u64)>,
    /// Last checkpoint number used in this generation, and the last one
    /// known written.
    checkpoint_seq: u64,
    checkpoint_written: Option<u64>,
    cache: VecDeque<(u64, Rc<Vec<u8>>)>,
    fenced: Option<String>,
    /// Recovery cut the log at damage: keep every object this time.
    recovery_cut: bool,
    pub notes: Vec<String>,
}

/// A candidate segment during recovery.
struct Candidate {
    base: u64,
    gen_: u64,
    /// Valid below this (kept segments of older generations).
    cut: Option<u64>,
}

/// The batches of one segment object starting at `base`, checked (framing,
/// CRC, contiguity), up to `cut` if given. Stops at the first problem and
/// says what it was.
fn scan(bytes: &[u8], base: u64, cut: Option<u64>) -> (Vec<(BatchHeader, usize)>, Option<String>) {
    let mut out = Vec::new();
    let mut pos = 0usize;
    let mut expected = base;
    while pos < bytes.len() {
        if cut.is_some_and(|c| expected >= c) {
            break;
        }
        let rest = &bytes[pos..];
        let h = match BatchHeader::parse(rest) {
            Ok(h) => h,
            Err(e) => return (out, Some(format!("bad batch at byte {pos}: {e}"))),
        };
        if let Err(e) = verify_crc(&h, rest) {
            return (
                out,
                Some(format!("batch at offset {} : {e}", h.base_offset)),
            );
        }
        if h.base_offset != expected {
            return (
                out,
                Some(format!(
                    "batch at byte {pos} starts at offset {}, expected {expected}",
                    h.base_offset
                )),
            );
        }
        if cut.is_some_and(|c| h.next_offset() > c) {
            return (
                out,
                Some(format!("a batch crosses the cut at {}", cut.unwrap_or(0))),
            );
        }
        expected = h.next_offset();
        out.push((h, pos));
        pos += h.batch_len as usize;
    }
    if let Some(c) = cut
        && expected != c
    {
        return (
            out,
            Some(format!("ends at offset {expected}, before its cut {c}")),
        );
    }
    (out, None)
}

impl S3Log {
    /// Open (recover) the log under `<prefix><topic>/<partition>/` as the
    /// next writer generation: fence, list, recover, write the manifest,
    /// check, collect garbage.
    pub fn open(config: Config, topic: &str, partition: u32) -> Result<S3Log, Error> {
        let p = layout::partition_prefix(&config.prefix, topic, partition);
        let client = s3::Client {
            authority: config.authority.clone(),
            bucket: config.bucket.clone(),
            region: config.region.clone(),
            creds: config.creds,
            timeout: config.timeout,
            // A segment may end with one batch past segment.bytes.
            max_response: config.segment_bytes as usize
                + replicator_plugin_sdk::MAX_BATCH_LEN as usize
                + (1 << 20),
        };
        let mut log = S3Log {
            client,
            p,
            gen_: 0,
            segment_bytes: config.segment_bytes,
            upload_interval: config.upload_interval,
            cache_limit: config.cache_bytes,
            index: OffsetIndex::empty_at(0),
            segments: BTreeMap::new(),
            buffer: Vec::new(),
            buffer_marks: VecDeque::new(),
            buffer_base: 0,
            buffer_since: None,
            maybe_uploaded_end: 0,
            hw: 0,
            epochs: Vec::new(),
            checkpoint_seq: 0,
            checkpoint_written: None,
            cache: VecDeque::new(),
            fenced: None,
            recovery_cut: false,
            notes: Vec::new(),
        };
        // 1. Fence first: from the moment `gen/<next>` exists, no older
        // generation's write can pass its post-write check, so everything
        // one reported as successful is visible to the listing below.
        let fences = log.client.list(&format!("{}gen/", log.p), None, None)?;
        let top = fences
            .iter()
            .filter_map(|l| match layout::parse_key(&log.p, &l.key) {
                Name::Fence(g) => Some(g),
                _ => None,
            })
            .max()
            .unwrap_or(0);
        let next = top + 1;
        log.claim_fence(next).map_err(|e| match e {
            Error::Fenced(_) => Error::Conflict(format!(
                "another instance took generation {next} of {} at the same time; two nodes may share this prefix",
                log.p
            )),
            e => e,
        })?;
        // 2. Recover from the newest manifest and what its generation
        // wrote after it.
        let listing = log.client.list(&log.p, None, None)?;
        let names: Vec<Name> = listing
            .iter()
            .map(|l| layout::parse_key(&log.p, &l.key))
            .collect();
        let newest = names
            .iter()
            .filter_map(|n| match n {
                Name::Claim(g) if *g < next => Some(*g),
                _ => None,
            })
            .max();
        let claim = match newest {
            None if names
                .iter()
                .any(|n| matches!(n, Name::Segment { .. } | Name::Checkpoint { .. })) =>
            {
                return Err(Error::Corrupt(format!(
                    "{} holds segments or checkpoints but no manifest says which count; refusing to open",
                    log.p
                )));
            }
            None => Claim {
                gen_: 0,
                end: 0,
                checkpoint: Checkpoint::default(),
                kept: Vec::new(),
            },
            Some(g) => {
                let key = layout::claim_key(&log.p, g);
                let bytes = log
                    .client
                    .get(&key)?
                    .ok_or_else(|| Error::Corrupt(format!("{key} was listed but is gone")))?;
                Claim::decode(&bytes).map_err(|e| {
                    Error::Corrupt(format!(
                        "{key}: {e}; this manifest says which segments count, so the log cannot be recovered without it"
                    ))
                })?
            }
        };
        let listed: BTreeSet<(u64, u64)> = names
            .iter()
            .filter_map(|n| match n {
                Name::Segment { base, gen_ } => Some((*base, *gen_)),
                _ => None,
            })
            .collect();
        let mut checkpoints: Vec<u64> = names
            .iter()
            .filter_map(|n| match n {
                Name::Checkpoint { gen_, seq } if *gen_ == claim.gen_ => Some(*seq),
                _ => None,
            })
            .collect();
        checkpoints.sort_unstable_by(|a, b| b.cmp(a));
        log.recover(&claim, &listed, &checkpoints)?;
        // 3. Seal: the manifest makes the generation the one to recover
        // from. Then check nobody fenced us meanwhile; only then collect
        // garbage (a newer opener fenced after this check recovers from
        // this manifest, so nothing it needs is deleted).
        log.write_claim(next)?;
        log.gen_ = next;
        log.check_fencing()?;
        if !log.recovery_cut {
            log.collect_garbage(&listing);
        }
        Ok(log)
    }

    /// Rebuild the index from `claim` and the listed segments.
    fn recover(
        &mut self,
        claim: &Claim,
        listed: &BTreeSet<(u64, u64)>,
        checkpoints: &[u64],
    ) -> Result<(), Error> {
        // The newest readable checkpoint of the claimed generation, else
        // the one the claim carries.
        let mut checkpoint = claim.checkpoint.clone();
        for &seq in checkpoints {
            let key = layout::checkpoint_key(&self.p, claim.gen_, seq);
            if let Some(bytes) = self.client.get(&key)? {
                match layout::decode_checkpoint(&bytes) {
                    Ok((g, c)) if g == claim.gen_ => {
                        checkpoint = c;
                        break;
                    }
                    Ok((g, _)) => self
                        .notes
                        .push(format!("{key} names generation {g}; skipped")),
                    Err(e) => self.notes.push(format!("{key} is damaged ({e}); skipped")),
                }
            }
        }
        let mut candidates: Vec<Candidate> = claim
            .kept
            .iter()
            .map(|k| Candidate {
                base: k.base,
                gen_: k.gen_,
                cut: Some(k.cut),
            })
            .collect();
        candidates.extend(
            listed
                .iter()
                .filter(|(base, g)| *g == claim.gen_ && *base >= claim.end)
                .map(|&(base, gen_)| Candidate {
                    base,
                    gen_,
                    cut: None,
                }),
        );
        let mut index: OffsetIndex<Loc> = OffsetIndex::empty_at(claim.end);
        let mut segments = BTreeMap::new();
        let mut started = false;
        let next_bases: Vec<Option<u64>> = (0..candidates.len())
            .map(|i| candidates.get(i + 1).map(|c| c.base))
            .collect();
        for (c, next_base) in candidates.into_iter().zip(next_bases) {
            // Wholly below the log start: deleted, or about to be by the
            // prefix delete that moved the start (maybe still running in
            // an older instance).
            let end_at_most = c.cut.or(next_base);
            if end_at_most.is_some_and(|end| end <= checkpoint.log_start) {
                continue;
            }
            if !started {
                // The first kept segment starts the log; without one, the
                // generation's own segments start at the manifest's end.
                let start = if c.cut.is_some() { c.base } else { claim.end };
                index = OffsetIndex::empty_at(start);
                started = true;
            }
            let key = layout::segment_key(&self.p, c.base, c.gen_);
            if c.base > index.log_end() && c.base <= checkpoint.log_start {
                // The gap lies below the log start: its segments were
                // deleted with the prefix.
                index = OffsetIndex::empty_at(c.base);
                segments.clear();
            }
            // Objects that should be there and are not were deleted behind
            // the plugin's back: refuse, leaving everything as it is,
            // rather than cut the log and collect the rest as garbage.
            if c.base != index.log_end() {
                return Err(Error::Corrupt(format!(
                    "{key} starts at {}, but the log before it ends at {}: a segment is missing; refusing to open",
                    c.base,
                    index.log_end()
                )));
            }
            let Some(bytes) = self.client.get(&key)? else {
                return Err(Error::Corrupt(format!(
                    "{key} is missing from the store (the log reaches {} before it); refusing to open",
                    index.log_end()
                )));
            };
            let (batches, problem) = scan(&bytes, c.base, c.cut);
            for (h, pos) in &batches {
                index.push(Entry {
                    base: h.base_offset,
                    next: h.next_offset(),
                    leader_epoch: h.leader_epoch,
                    len: h.batch_len,
                    loc: Loc::Object {
                        base: c.base,
                        pos: *pos,
                    },
                });
            }
            if !batches.is_empty() {
                segments.insert(
                    c.base,
                    Segment {
                        gen_: c.gen_,
                        end: index.log_end(),
                    },
                );
                self.cache_insert(c.base, Rc::new(bytes));
            }
            if let Some(why) = problem {
                // Damage inside an object (bit rot, a bad write by a
                // foreign tool): like a torn tail, cut back to the last
                // whole batch; replication refills the rest.
                self.notes.push(format!(
                    "{key}: {why}; the log is cut back to {}; later objects are kept until the next open",
                    index.log_end()
                ));
                self.recovery_cut = true;
                break;
            }
        }
        if checkpoint.log_start > index.log_start() {
            index.delete_prefix(checkpoint.log_start);
        }
        let end = index.log_end();
        segments.retain(|_, s| s.end > index.log_start());
        let before = checkpoint.epochs.len();
        index::truncate_epochs(&mut checkpoint.epochs, end, |e| e.1);
        if checkpoint.epochs.len() != before {
            self.notes.push(format!(
                "dropped {} leader-epoch entries at or past the log end {end}",
                before - checkpoint.epochs.len()
            ));
        }
        self.index = index;
        self.segments = segments;
        self.cut_buffer(0);
        self.buffer_base = end;
        self.maybe_uploaded_end = end;
        self.hw = checkpoint.hw;
        self.epochs = checkpoint.epochs;
        Ok(())
    }

    fn checkpoint(&self) -> Checkpoint {
        Checkpoint {
            log_start: self.index.log_start(),
            hw: self.hw,
            epochs: self.epochs.clone(),
        }
    }

    fn kept(&self) -> Vec<Kept> {
        self.segments
            .iter()
            .map(|(&base, s)| Kept {
                base,
                gen_: s.gen_,
                cut: s.end,
            })
            .collect()
    }

    /// Delete what no manifest from ours on can need: older fences, manifests and
    /// checkpoints, segments that neither count nor are ours. Best effort.
    fn collect_garbage(&mut self, segments_listed: &[s3::Listed]) {
        let mut doomed: Vec<String> = Vec::new();
        for l in segments_listed {
            if let Name::Segment { base, gen_ } = layout::parse_key(&self.p, &l.key)
                && gen_ < self.gen_
                && self.segments.get(&base).is_none_or(|s| s.gen_ != gen_)
            {
                doomed.push(l.key.clone());
            }
        }
        if let Ok(control) = self.client.list(&self.p, None, None) {
            for l in control {
                match layout::parse_key(&self.p, &l.key) {
                    Name::Fence(g) | Name::Claim(g) | Name::Checkpoint { gen_: g, .. }
                        if g < self.gen_ =>
                    {
                        doomed.push(l.key)
                    }
                    _ => {}
                }
            }
        }
        for key in doomed.iter().take(1000) {
            if self.client.delete(key).is_err() {
                break;
            }
        }
    }

    fn fence(&mut self, why: String) -> Error {
        self.fenced = Some(why.clone());
        Error::Fenced(why)
    }

    /// Fail if a newer generation has been claimed, or if this writer's
    /// own fence is gone: the store lost what it held (a bucket emptied or
    /// replaced, an in-memory S3 server restarted). Writing on from memory
    /// would leave segments no manifest names, and a log that only this
    /// instance's memory holds; as fenced, the host reopens the log from
    /// what the store holds, which says what was lost. (One listing, as
    /// before: from just below this writer's fence.)
    fn check_fencing(&mut self) -> Result<(), Error> {
        let mine = layout::fence_key(&self.p, self.gen_);
        let below = self
            .gen_
            .checked_sub(1)
            .map(|g| layout::fence_key(&self.p, g));
        let listed = self
            .client
            .list(&format!("{}gen/", self.p), below.as_deref(), Some(2))?;
        // Keys past `below`, in order: this writer's fence first, unless
        // it is gone; a newer one after it.
        let keys: Vec<&str> = listed.iter().map(|l| l.key.as_str()).collect();
        if let Some(n) = keys.iter().find(|k| **k > mine.as_str()) {
            return Err(self.fence(format!(
                "fenced: {n} exists, newer than this writer's generation {}; another instance opened this partition",
                self.gen_
            )));
        }
        if !keys.contains(&mine.as_str()) {
            return Err(self.fence(format!(
                "the store no longer holds this writer's fence {mine}: it lost what it held (a bucket emptied or replaced, an S3 server restarted without its data); reopening from what it holds now"
            )));
        }
        Ok(())
    }

    fn writable(&self) -> Result<(), Error> {
        match &self.fenced {
            Some(why) => Err(Error::Fenced(why.clone())),
            None => Ok(()),
        }
    }

    /// Claim the next generation for the state as it is now (after a
    /// truncation or reset that may undo uploaded data).
    fn claim_next(&mut self) -> Result<(), Error> {
        let next = self.gen_ + 1;
        self.claim_fence(next)?;
        self.write_claim(next)?;
        self.gen_ = next;
        self.checkpoint_seq = 0;
        self.checkpoint_written = None;
        self.maybe_uploaded_end = self.buffer_base;
        self.check_fencing()
    }

    /// Create generation `g`'s fence; someone else having it fences us.
    fn claim_fence(&mut self, g: u64) -> Result<(), Error> {
        let key = layout::fence_key(&self.p, g);
        let body = format!("replicator-s3 fence v1\ngeneration {g}\n");
        match self.client.put(&key, body.as_bytes(), true) {
            Ok(()) => Ok(()),
            Err(s3::Error::Exists) => Err(self.fence(format!(
                "fenced: generation {g} was taken by another instance"
            ))),
            Err(e) => Err(e.into()),
        }
    }

    /// Write generation `g`'s manifest of the log as it is now.
    fn write_claim(&mut self, g: u64) -> Result<(), Error> {
        let claim = Claim {
            gen_: g,
            end: self.buffer_base,
            checkpoint: self.checkpoint(),
            kept: self.kept(),
        };
        let key = layout::claim_key(&self.p, g);
        match self.client.put(&key, &claim.encode(), true) {
            Ok(()) => Ok(()),
            Err(s3::Error::Exists) => Err(self.fence(format!(
                "fenced: {key} exists; another instance uses generation {g}"
            ))),
            Err(e) => Err(e.into()),
        }
    }

    fn write_checkpoint(&mut self) -> Result<(), Error> {
        let seq = self.checkpoint_seq + 1;
        let key = layout::checkpoint_key(&self.p, self.gen_, seq);
        let body = layout::encode_checkpoint(self.gen_, &self.checkpoint());
        // A number is never reused, even after a failure whose PUT may
        // still land.
        self.checkpoint_seq = seq;
        match self.client.put(&key, &body, true) {
            Ok(()) => {}
            Err(s3::Error::Exists) => {
                return Err(self.fence(format!(
                    "fenced: {key} exists; another writer uses generation {}",
                    self.gen_
                )));
            }
            Err(e) => return Err(e.into()),
        }
        self.check_fencing()?;
        // The previous one no longer counts (best effort; open collects
        // what is left).
        if let Some(prev) = self.checkpoint_written.replace(seq) {
            let _ = self
                .client
                .delete(&layout::checkpoint_key(&self.p, self.gen_, prev));
        }
        Ok(())
    }

    /// Upload the buffer as segment objects of at most `segment.bytes`
    /// (or one batch, if a batch alone is larger): a follower appends whole
    /// fetch responses, which may be larger than a segment.
    fn upload(&mut self) -> Result<(), Error> {
        self.writable()?;
        while let Some(&(first_len, first_next)) = self.buffer_marks.front() {
            let (len, end) = self
                .buffer_marks
                .iter()
                .take_while(|(e, _)| *e as u64 <= self.segment_bytes)
                .last()
                .copied()
                .unwrap_or((first_len, first_next));
            let key = layout::segment_key(&self.p, self.buffer_base, self.gen_);
            self.maybe_uploaded_end = self.maybe_uploaded_end.max(self.index.log_end());
            match self.client.put(&key, &self.buffer[..len], true) {
                Ok(()) => {
                    self.check_fencing()?;
                    self.uploaded(len, end);
                }
                Err(s3::Error::Exists) => self.resume_upload(&key)?,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// The segment key exists: an earlier attempt whose answer was lost
    /// stored it. If it holds a prefix of the buffer that ends at a batch,
    /// that prefix is uploaded; the caller goes on with the rest.
    fn resume_upload(&mut self, key: &str) -> Result<(), Error> {
        let existing = self.client.get(key)?.unwrap_or_default();
        let boundary = self
            .buffer_marks
            .iter()
            .find(|(e, _)| *e == existing.len())
            .map(|&(_, next)| next);
        match boundary {
            Some(prefix_end) if self.buffer.starts_with(&existing) => {
                self.check_fencing()?;
                self.uploaded(existing.len(), prefix_end);
                Ok(())
            }
            _ => Err(self.fence(format!(
                "fenced: {key} exists with other content; another writer uses generation {}",
                self.gen_
            ))),
        }
    }

    /// The first `len` buffered bytes, up to offset `end`, are a segment now.
    fn uploaded(&mut self, len: usize, end: u64) {
        let base = self.buffer_base;
        self.segments.insert(
            base,
            Segment {
                gen_: self.gen_,
                end,
            },
        );
        // Buffered batches are the index's tail: stop at the first
        // uploaded one.
        for loc in self.index.locs_mut().rev() {
            let Loc::Buffer(pos) = *loc else { break };
            *loc = if pos < len {
                Loc::Object { base, pos }
            } else {
                Loc::Buffer(pos - len)
            };
        }
        let rest = self.buffer.split_off(len);
        let object = std::mem::replace(&mut self.buffer, rest);
        self.buffer_marks.retain(|(e, _)| *e > len);
        for (e, _) in self.buffer_marks.iter_mut() {
            *e -= len;
        }
        self.cache_insert(base, Rc::new(object));
        self.buffer_base = end;
        if self.buffer.is_empty() {
            self.buffer_since = None;
        }
    }

    /// Keep the first `len` buffered bytes (a batch boundary).
    fn cut_buffer(&mut self, len: usize) {
        self.buffer.truncate(len);
        self.buffer_marks.retain(|(e, _)| *e <= len);
        if self.buffer.is_empty() {
            self.buffer_since = None;
        }
    }

    /// Cache a segment's bytes, evicting the oldest entries past
    /// `cache.bytes` (the newest always stays).
    fn cache_insert(&mut self, base: u64, bytes: Rc<Vec<u8>>) {
        self.cache.retain(|(b, _)| *b != base);
        self.cache.push_back((base, bytes));
        let mut used: u64 = self.cache.iter().map(|(_, o)| o.len() as u64).sum();
        while used > self.cache_limit && self.cache.len() > 1 {
            if let Some((_, o)) = self.cache.pop_front() {
                used -= o.len() as u64;
            }
        }
    }

    fn object(&mut self, base: u64) -> Result<Rc<Vec<u8>>, Error> {
        if let Some((_, o)) = self.cache.iter().find(|(b, _)| *b == base) {
            return Ok(o.clone());
        }
        let seg = self.segments.get(&base).copied().ok_or_else(|| {
            Error::Corrupt(format!(
                "no segment at {base} for a batch that points there"
            ))
        })?;
        let key = layout::segment_key(&self.p, base, seg.gen_);
        let Some(bytes) = self.client.get(&key)? else {
            // A newer owner may have collected it: if so, say fenced.
            self.check_fencing()?;
            return Err(Error::Corrupt(format!("{key} is gone from the store")));
        };
        let o = Rc::new(bytes);
        self.cache_insert(base, o.clone());
        Ok(o)
    }

    pub fn bounds(&self) -> (u64, u64) {
        (self.index.log_start(), self.index.log_end())
    }

    pub fn append(&mut self, bytes: Vec<u8>) -> Result<u64, Error> {
        self.writable()?;
        let located = index::check_append(&bytes, self.index.log_end())?;
        let due = self
            .buffer_since
            .is_some_and(|t| t.elapsed() >= self.upload_interval);
        if !self.buffer.is_empty()
            && (self.buffer.len() + bytes.len() > self.segment_bytes as usize || due)
        {
            self.upload()?;
        }
        let at = self.buffer.len();
        for l in &located {
            let h = l.header;
            self.buffer_marks
                .push_back((at + l.start + h.batch_len as usize, h.next_offset()));
            self.index.push(Entry {
                base: h.base_offset,
                next: h.next_offset(),
                leader_epoch: h.leader_epoch,
                len: h.batch_len,
                loc: Loc::Buffer(at + l.start),
            });
        }
        if self.buffer.is_empty() {
            self.buffer = bytes;
            self.buffer_since = Some(Instant::now());
        } else {
            self.buffer.extend_from_slice(&bytes);
        }
        Ok(self.index.log_end())
    }

    pub fn read(&mut self, offset: u64, max_bytes: u32) -> Result<Vec<u8>, Error> {
        let range = self
            .index
            .read_range(offset, max_bytes)
            .map_err(|_| Error::OutOfRange)?;
        let parts: Vec<(Loc, usize)> = range
            .filter_map(|i| self.index.get(i))
            .map(|e| (e.loc, e.len as usize))
            .collect();
        let mut out = Vec::with_capacity(parts.iter().map(|(_, n)| n).sum());
        for (loc, len) in parts {
            let slice_err =
                || Error::Corrupt(format!("a batch of {len} bytes lies past its object"));
            match loc {
                Loc::Buffer(pos) => {
                    out.extend_from_slice(self.buffer.get(pos..pos + len).ok_or_else(slice_err)?)
                }
                Loc::Object { base, pos } => {
                    let o = self.object(base)?;
                    out.extend_from_slice(o.get(pos..pos + len).ok_or_else(slice_err)?);
                }
            }
        }
        Ok(out)
    }

    pub fn truncate(&mut self, offset: u64) -> Result<u64, Error> {
        self.writable()?;
        if offset < self.index.log_start() || offset > self.index.log_end() {
            return Err(Error::OutOfRange);
        }
        let start_before = self.index.log_start();
        let removed = self.index.truncate(offset);
        let end = self.index.log_end();
        let epochs_before = self.epochs.len();
        index::truncate_epochs(&mut self.epochs, end, |e| e.1);
        if end >= self.maybe_uploaded_end {
            // Only buffered batches went: nothing stored names them.
            if let Some(Loc::Buffer(pos)) = removed.first().map(|e| e.loc) {
                self.cut_buffer(pos);
            }
            // A truncation below the log start pulls the start back too.
            if self.epochs.len() != epochs_before || self.index.log_start() != start_before {
                self.write_checkpoint()?;
            }
            return Ok(end);
        }
        // Uploaded data may be undone: the new generation's claim lists
        // what still counts.
        if end < self.buffer_base {
            self.cut_buffer(0);
            self.buffer_base = end;
        } else if let Some(Loc::Buffer(pos)) = removed.first().map(|e| e.loc) {
            self.cut_buffer(pos);
        }
        let dropped = self.forget_segments(|b, _| b >= end);
        for s in self.segments.values_mut() {
            s.end = s.end.min(end);
        }
        self.claim_next()?;
        self.delete_segments(dropped);
        Ok(end)
    }

    /// Empty the log and restart it at `offset`, below the start too (the
    /// WIT's `reset`): as a reset past the end, a new generation whose
    /// claim keeps no segment, with an empty epoch cache.
    pub fn reset(&mut self, offset: u64) -> Result<(), Error> {
        self.writable()?;
        self.index = OffsetIndex::empty_at(offset);
        self.epochs.clear();
        let doomed = self.forget_segments(|_, _| true);
        self.cut_buffer(0);
        self.buffer_base = offset;
        self.claim_next()?;
        self.delete_segments(doomed);
        Ok(())
    }

    pub fn delete_prefix(&mut self, offset: u64) -> Result<(), Error> {
        self.writable()?;
        if offset <= self.index.log_start() {
            return Ok(());
        }
        let past_end = offset > self.index.log_end();
        self.index.delete_prefix(offset);
        // The newest segment stays (until the next open collects it): an
        // opener lists it as its own generation's last segment and could
        // not tell a late DELETE from a hole.
        let newest = self.segments.keys().next_back().copied();
        let doomed =
            self.forget_segments(|b, s| past_end || (s.end <= offset && Some(b) != newest));
        if past_end {
            // A follower reset to its leader's log start: start over there.
            self.cut_buffer(0);
            self.buffer_base = offset;
            self.claim_next()?;
        } else {
            self.write_checkpoint()?;
        }
        self.delete_segments(doomed);
        Ok(())
    }

    /// Stop counting (and caching) the segments `drop` picks; returns them
    /// for [`Self::delete_segments`] once the new state is durable.
    fn forget_segments(&mut self, drop: impl Fn(u64, &Segment) -> bool) -> Vec<(u64, Segment)> {
        let gone: Vec<(u64, Segment)> = self
            .segments
            .iter()
            .filter(|(b, s)| drop(**b, s))
            .map(|(b, s)| (*b, *s))
            .collect();
        for (b, _) in &gone {
            self.segments.remove(b);
            self.cache.retain(|(c, _)| c != b);
        }
        gone
    }

    /// Delete forgotten segments' objects (best effort: the next open
    /// collects what is left).
    fn delete_segments(&self, gone: Vec<(u64, Segment)>) {
        for (b, s) in gone {
            let _ = self.client.delete(&layout::segment_key(&self.p, b, s.gen_));
        }
    }

    pub fn high_watermark(&self) -> u64 {
        self.hw
    }

    pub fn set_high_watermark(&mut self, hw: u64) -> Result<(), Error> {
        self.upload()?;
        let old = std::mem::replace(&mut self.hw, hw);
        let r = self.write_checkpoint();
        if r.is_err() {
            self.hw = old;
        }
        r
    }

    pub fn epochs(&self) -> &[(u32, u64)] {
        &self.epochs
    }

    pub fn set_epochs(&mut self, epochs: Vec<(u32, u64)>) -> Result<(), Error> {
        self.upload()?;
        let old = std::mem::replace(&mut self.epochs, epochs);
        let r = self.write_checkpoint();
        if r.is_err() {
            self.epochs = old;
        }
        r
    }

    pub fn flush(&mut self) -> Result<(), Error> {
        self.upload()
    }
}
