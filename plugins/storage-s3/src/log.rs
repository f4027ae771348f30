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
//! Fencing (see `layout.rs` for the names): opening claims the next
//! generation with `If-None-Match: *`, so two openers never share one.
//! After every write the writer lists claims above its own; if there is
//! one, it is fenced and its write is reported failed. An opener claims
//! first and lists again afterwards, so a write of the previous generation
//! that raced the claim and was reported successful is seen and kept.
//! Truncating data that may have been uploaded also claims a new
//! generation, whose claim says exactly which older segments still count
//! and where they are cut: nothing is ever rewritten in place.

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
    buffer_base: u64,
    buffer_since: Option<Instant>,
    /// Highest offset an upload may have stored, even if it reported
    /// failure; truncating below it needs a new generation.
    maybe_uploaded_end: u64,
    hw: u64,
    epochs: Vec<(u32, u64)>,
    cache: VecDeque<(u64, Rc<Vec<u8>>)>,
    cache_used: u64,
    fenced: Option<String>,
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
    /// Open (recover) the log under `<prefix><topic>/<partition>/` and
    /// claim the next writer generation.
    pub fn open(config: Config, topic: &str, partition: u32) -> Result<S3Log, Error> {
        let p = layout::partition_prefix(&config.prefix, topic, partition);
        let client = s3::Client {
            authority: config.authority.clone(),
            bucket: config.bucket.clone(),
            region: config.region.clone(),
            creds: config.creds,
            timeout: config.timeout,
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
            buffer_base: 0,
            buffer_since: None,
            maybe_uploaded_end: 0,
            hw: 0,
            epochs: Vec::new(),
            cache: VecDeque::new(),
            cache_used: 0,
            fenced: None,
            notes: Vec::new(),
        };
        let mut base_claim: Option<Claim> = None;
        for _attempt in 0..4 {
            let listing = log.client.list(&log.p, None, None)?;
            let names: Vec<Name> = listing
                .iter()
                .map(|l| layout::parse_key(&log.p, &l.key))
                .collect();
            let top = names
                .iter()
                .filter_map(|n| match n {
                    Name::Claim(g) => Some(*g),
                    _ => None,
                })
                .max();
            // The claim to recover from: on a retry, the same one as
            // before (our own later claim lacks what raced it).
            let claim = match (&base_claim, top) {
                (Some(c), _) => c.clone(),
                (None, None) => Claim {
                    gen_: 0,
                    end: 0,
                    checkpoint: Checkpoint::default(),
                    kept: Vec::new(),
                },
                (None, Some(g)) => {
                    let key = layout::claim_key(&log.p, g);
                    let bytes = log.client.get(&key)?.ok_or_else(|| {
                        Error::Unavailable(format!("{key} was listed but is gone; retry"))
                    })?;
                    Claim::decode(&bytes).map_err(|e| {
                        Error::Corrupt(format!(
                            "{key}: {e}; this claim says which segments count, so the log cannot be recovered without it"
                        ))
                    })?
                }
            };
            base_claim = Some(claim.clone());
            let seen: BTreeSet<(u64, u64)> = names
                .iter()
                .filter_map(|n| match n {
                    Name::Segment { base, gen_ } => Some((*base, *gen_)),
                    _ => None,
                })
                .collect();
            let has_checkpoint = names.contains(&Name::Checkpoint(claim.gen_));
            log.recover(&claim, &seen, has_checkpoint)?;
            // Claim the next generation; exactly one opener gets it.
            let next = top.unwrap_or(0).max(claim.gen_) + 1;
            let new_claim = Claim {
                gen_: next,
                end: log.buffer_base,
                checkpoint: log.checkpoint(),
                kept: log.kept(),
            };
            let key = layout::claim_key(&log.p, next);
            match log.client.put(&key, &new_claim.encode(), true) {
                Ok(()) => {}
                Err(s3::Error::Exists) => {
                    return Err(Error::Conflict(format!(
                        "another instance claimed generation {next} of {} at the same time; two nodes may share this prefix",
                        log.p
                    )));
                }
                Err(e) => return Err(e.into()),
            }
            log.gen_ = next;
            // A segment of the generation we recovered from that was
            // stored after our listing may have been reported successful
            // (its writer had not seen our claim yet): recover again.
            let after = log.client.list(&format!("{}seg/", log.p), None, None)?;
            let raced = after.iter().any(|l| {
                matches!(layout::parse_key(&log.p, &l.key),
                    Name::Segment { base, gen_ } if gen_ == claim.gen_ && !seen.contains(&(base, gen_)))
            });
            if raced {
                log.notes.push(format!(
                    "generation {} wrote while generation {next} was being claimed; recovering again",
                    claim.gen_
                ));
                continue;
            }
            log.check_fencing()?;
            log.collect_garbage(&after);
            return Ok(log);
        }
        Err(Error::Conflict(format!(
            "an older writer of {} kept writing while this one opened; is another node using the same prefix?",
            log.p
        )))
    }

    /// Rebuild the index from `claim` and the listed segments.
    fn recover(
        &mut self,
        claim: &Claim,
        listed: &BTreeSet<(u64, u64)>,
        has_checkpoint: bool,
    ) -> Result<(), Error> {
        let mut checkpoint = claim.checkpoint.clone();
        if has_checkpoint {
            let key = layout::checkpoint_key(&self.p, claim.gen_);
            match self.client.get(&key)? {
                Some(bytes) => match layout::decode_checkpoint(&bytes) {
                    Ok((g, c)) if g == claim.gen_ => checkpoint = c,
                    Ok((g, _)) => self
                        .notes
                        .push(format!("{key} names generation {g}; using the claim's")),
                    Err(e) => self.notes.push(format!(
                        "{key} is damaged ({e}); using the claim's checkpoint"
                    )),
                },
                None => {}
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
        let mut own_started = false;
        for c in candidates {
            if c.cut.is_some_and(|cut| cut <= checkpoint.log_start) {
                continue; // wholly below the log start: deleted or deletable
            }
            if c.cut.is_none() && !own_started {
                own_started = true;
                if !started {
                    index = OffsetIndex::empty_at(claim.end);
                    started = true;
                }
            }
            if !started {
                index = OffsetIndex::empty_at(c.base);
                started = true;
            }
            let key = layout::segment_key(&self.p, c.base, c.gen_);
            if c.base > index.log_end() && c.base <= checkpoint.log_start {
                // The gap lies below the log start: its segments were
                // deleted with the prefix.
                index = OffsetIndex::empty_at(c.base);
                segments.clear();
            }
            if c.base != index.log_end() {
                self.notes.push(format!(
                    "{key} starts at {}, but the log ends at {}: the log is cut there",
                    c.base,
                    index.log_end()
                ));
                break;
            }
            let Some(bytes) = self.client.get(&key)? else {
                self.notes.push(format!(
                    "{key} is missing: the log is cut at {}",
                    index.log_end()
                ));
                break;
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
                self.notes.push(format!(
                    "{key}: {why}; the log is cut back to {}",
                    index.log_end()
                ));
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
        self.buffer.clear();
        self.buffer_base = end;
        self.buffer_since = None;
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

    /// Delete what no claim from ours on can need: older claims and
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
                    Name::Claim(g) | Name::Checkpoint(g) if g < self.gen_ => doomed.push(l.key),
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

    /// Fail if a newer generation has been claimed.
    fn check_fencing(&mut self) -> Result<(), Error> {
        let newer = self.client.list(
            &format!("{}gen/", self.p),
            Some(&layout::claim_key(&self.p, self.gen_)),
            Some(1),
        )?;
        if let Some(n) = newer.first() {
            return Err(self.fence(format!(
                "fenced: {} was claimed after this writer's generation {}; another instance opened this partition",
                n.key, self.gen_
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
        let claim = Claim {
            gen_: next,
            end: self.buffer_base,
            checkpoint: self.checkpoint(),
            kept: self.kept(),
        };
        let key = layout::claim_key(&self.p, next);
        match self.client.put(&key, &claim.encode(), true) {
            Ok(()) => {}
            Err(s3::Error::Exists) => {
                return Err(self.fence(format!(
                    "fenced: generation {next} was claimed by another instance"
                )));
            }
            Err(e) => return Err(e.into()),
        }
        self.gen_ = next;
        self.maybe_uploaded_end = self.buffer_base;
        self.check_fencing()
    }

    fn write_checkpoint(&mut self) -> Result<(), Error> {
        let key = layout::checkpoint_key(&self.p, self.gen_);
        let body = layout::encode_checkpoint(self.gen_, &self.checkpoint());
        self.client.put(&key, &body, false)?;
        self.check_fencing()
    }

    /// Upload the buffer as one segment object.
    fn upload(&mut self) -> Result<(), Error> {
        self.writable()?;
        if self.buffer.is_empty() {
            return Ok(());
        }
        let end = self.index.log_end();
        let key = layout::segment_key(&self.p, self.buffer_base, self.gen_);
        self.maybe_uploaded_end = self.maybe_uploaded_end.max(end);
        match self.client.put(&key, &self.buffer, true) {
            Ok(()) => {}
            Err(s3::Error::Exists) => return self.resume_upload(&key),
            Err(e) => return Err(e.into()),
        }
        self.check_fencing()?;
        self.uploaded(self.buffer.len(), end);
        Ok(())
    }

    /// The segment key exists: an earlier attempt whose answer was lost
    /// stored it. If it holds a prefix of the buffer, that prefix is
    /// uploaded and the rest goes into a segment of its own.
    fn resume_upload(&mut self, key: &str) -> Result<(), Error> {
        let existing = self.client.get(key)?.unwrap_or_default();
        let boundary = self.index.entries().find_map(|e| match e.loc {
            Loc::Buffer(pos) if pos + e.len as usize == existing.len() => Some(e.next),
            _ => None,
        });
        match boundary {
            Some(prefix_end) if self.buffer.starts_with(&existing) => {
                self.check_fencing()?;
                self.uploaded(existing.len(), prefix_end);
                self.upload()
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
        for loc in self.index.locs_mut() {
            if let Loc::Buffer(pos) = *loc {
                *loc = if pos < len {
                    Loc::Object { base, pos }
                } else {
                    Loc::Buffer(pos - len)
                };
            }
        }
        let rest = self.buffer.split_off(len);
        let object = std::mem::replace(&mut self.buffer, rest);
        self.cache_insert(base, Rc::new(object));
        self.buffer_base = end;
        if self.buffer.is_empty() {
            self.buffer_since = None;
        }
    }

    fn cache_insert(&mut self, base: u64, bytes: Rc<Vec<u8>>) {
        self.cache.retain(|(b, _)| *b != base);
        self.cache_used = self.cache.iter().map(|(_, o)| o.len() as u64).sum();
        self.cache_used += bytes.len() as u64;
        self.cache.push_back((base, bytes));
        while self.cache_used > self.cache_limit && self.cache.len() > 1 {
            if let Some((_, o)) = self.cache.pop_front() {
                self.cache_used -= o.len() as u64;
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
        let bytes = self
            .client
            .get(&key)?
            .ok_or_else(|| Error::Corrupt(format!("{key} is gone from the store")))?;
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
                self.buffer.truncate(pos);
            }
            if self.buffer.is_empty() {
                self.buffer_since = None;
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
            self.buffer.clear();
            self.buffer_base = end;
            self.buffer_since = None;
        } else if let Some(Loc::Buffer(pos)) = removed.first().map(|e| e.loc) {
            self.buffer.truncate(pos);
        }
        let dropped: Vec<(u64, Segment)> = self
            .segments
            .iter()
            .filter(|(b, _)| **b >= end)
            .map(|(b, s)| (*b, *s))
            .collect();
        for (b, _) in &dropped {
            self.segments.remove(b);
            self.cache.retain(|(c, _)| c != b);
        }
        for s in self.segments.values_mut() {
            s.end = s.end.min(end);
        }
        self.claim_next()?;
        for (b, s) in dropped {
            let _ = self.client.delete(&layout::segment_key(&self.p, b, s.gen_));
        }
        Ok(end)
    }

    pub fn delete_prefix(&mut self, offset: u64) -> Result<(), Error> {
        self.writable()?;
        if offset <= self.index.log_start() {
            return Ok(());
        }
        let past_end = offset > self.index.log_end();
        self.index.delete_prefix(offset);
        let doomed: Vec<(u64, Segment)> = self
            .segments
            .iter()
            .filter(|(_, s)| past_end || s.end <= offset)
            .map(|(b, s)| (*b, *s))
            .collect();
        for (b, _) in &doomed {
            self.segments.remove(b);
            self.cache.retain(|(c, _)| c != b);
        }
        if past_end {
            // A follower reset to its leader's log start: start over there.
            self.buffer.clear();
            self.buffer_base = offset;
            self.buffer_since = None;
            self.claim_next()?;
        } else {
            self.write_checkpoint()?;
        }
        for (b, s) in doomed {
            let _ = self.client.delete(&layout::segment_key(&self.p, b, s.gen_));
        }
        Ok(())
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
