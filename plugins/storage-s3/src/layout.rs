//! Object names under a partition's prefix and the text format of the
//! small control objects (generation claims and checkpoints).
//!
//! Under `P = <prefix><topic>/<partition>/`:
//! - `P/gen/<g:020>`: the fence of writer generation `g`, created with
//!   `If-None-Match: *` so exactly one instance gets each generation. Its
//!   existence fences every older generation: their writes check for it.
//! - `P/man/<g:020>`: generation `g`'s claim (manifest), written once `g`
//!   knows the log it starts from: every segment of an older generation
//!   that still counts and where it is cut, the log end, and the
//!   checkpoint inherited. A generation writes nothing else before it,
//!   so a fence without a manifest (an opener that died) has no data.
//! - `P/seg/<base:020>-<g:020>`: a segment written by generation `g`,
//!   batches back to back from offset `base`. Never overwritten.
//! - `P/chk/<g:020>-<n:020>`: generation `g`'s `n`-th checkpoint (log
//!   start, high watermark, leader epochs), created with `If-None-Match: *`;
//!   the highest `n` counts. Never overwritten: a PUT that timed out and
//!   lands late can only add an older checkpoint, never replace a newer one
//!   (an epoch cache that lost an entry would mislead truncation).
//!
//! Control objects are text, one field per line, ending with a CRC-32C
//! line over the text before it, so an operator can read them and a
//! damaged one is detected.

use replicator_plugin_sdk::crc32c;

pub fn partition_prefix(prefix: &str, topic: &str, partition: u32) -> String {
    format!("{prefix}{topic}/{partition}/")
}

pub fn fence_key(p: &str, gen_: u64) -> String {
    format!("{p}gen/{gen_:020}")
}

pub fn claim_key(p: &str, gen_: u64) -> String {
    format!("{p}man/{gen_:020}")
}

pub fn segment_key(p: &str, base: u64, gen_: u64) -> String {
    format!("{p}seg/{base:020}-{gen_:020}")
}

pub fn checkpoint_key(p: &str, gen_: u64, seq: u64) -> String {
    format!("{p}chk/{gen_:020}-{seq:020}")
}

/// What a key under `p` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Name {
    Fence(u64),
    Claim(u64),
    Segment { base: u64, gen_: u64 },
    Checkpoint { gen_: u64, seq: u64 },
    Unknown,
}

pub fn parse_key(p: &str, key: &str) -> Name {
    let Some(rest) = key.strip_prefix(p) else {
        return Name::Unknown;
    };
    let num = |s: &str| (s.len() == 20).then(|| s.parse::<u64>().ok()).flatten();
    if let Some(g) = rest.strip_prefix("gen/").and_then(num) {
        return Name::Fence(g);
    }
    if let Some(g) = rest.strip_prefix("man/").and_then(num) {
        return Name::Claim(g);
    }
    if let Some(s) = rest.strip_prefix("chk/")
        && let Some((g, n)) = s.split_once('-')
        && let (Some(gen_), Some(seq)) = (num(g), num(n))
    {
        return Name::Checkpoint { gen_, seq };
    }
    if let Some(s) = rest.strip_prefix("seg/")
        && let Some((b, g)) = s.split_once('-')
        && let (Some(base), Some(gen_)) = (num(b), num(g))
    {
        return Name::Segment { base, gen_ };
    }
    Name::Unknown
}

/// Log start, high watermark and leader epochs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Checkpoint {
    pub log_start: u64,
    pub hw: u64,
    pub epochs: Vec<(u32, u64)>,
}

/// A segment of an older generation that the claim keeps, valid below
/// `cut` (a batch boundary).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kept {
    pub base: u64,
    pub gen_: u64,
    pub cut: u64,
}

/// The content of a generation claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub gen_: u64,
    /// The log end when claimed: this generation's segments start here.
    pub end: u64,
    pub checkpoint: Checkpoint,
    pub kept: Vec<Kept>,
}

fn seal(mut text: String) -> Vec<u8> {
    let crc = crc32c(text.as_bytes());
    text.push_str(&format!("crc {crc:08x}\n"));
    text.into_bytes()
}

/// The lines of a control object after checking its CRC line and header.
fn open<'a>(bytes: &'a [u8], header: &str) -> Result<Vec<&'a str>, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8".to_string())?;
    let body_end = text
        .trim_end_matches('\n')
        .rfind('\n')
        .map(|i| i + 1)
        .ok_or("too short")?;
    let (body, crc_line) = text.split_at(body_end);
    let stored = crc_line
        .trim()
        .strip_prefix("crc ")
        .and_then(|h| u32::from_str_radix(h, 16).ok())
        .ok_or("no crc line")?;
    let computed = crc32c(body.as_bytes());
    if stored != computed {
        return Err(format!(
            "CRC mismatch: stored {stored:08x}, computed {computed:08x}"
        ));
    }
    let mut lines = body.lines();
    if lines.next() != Some(header) {
        return Err(format!("does not start with `{header}`"));
    }
    Ok(lines.collect())
}

fn field<T: std::str::FromStr>(v: Option<&str>, what: &str) -> Result<T, String> {
    v.and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad {what}"))
}

fn checkpoint_lines(c: &Checkpoint) -> String {
    let mut s = format!("log-start {}\nhigh-watermark {}\n", c.log_start, c.hw);
    for (e, o) in &c.epochs {
        s.push_str(&format!("epoch {e} {o}\n"));
    }
    s
}

/// Parse the lines shared by claims and checkpoints; others go to `other`.
fn parse_lines<'a>(
    lines: &[&'a str],
    mut other: impl FnMut(&str, Vec<&'a str>) -> Result<bool, String>,
) -> Result<(u64, Checkpoint), String> {
    let mut gen_ = None;
    let mut c = Checkpoint::default();
    for line in lines {
        let mut parts = line.split(' ');
        let word = parts.next().unwrap_or("");
        let args: Vec<&str> = parts.collect();
        match word {
            "generation" => gen_ = Some(field(args.first().copied(), "generation")?),
            "log-start" => c.log_start = field(args.first().copied(), "log-start")?,
            "high-watermark" => c.hw = field(args.first().copied(), "high-watermark")?,
            "epoch" => c.epochs.push((
                field(args.first().copied(), "epoch")?,
                field(args.get(1).copied(), "epoch start")?,
            )),
            w => {
                if !other(w, args)? {
                    return Err(format!("unknown line `{line}`"));
                }
            }
        }
    }
    Ok((gen_.ok_or("no generation line")?, c))
}

impl Claim {
    pub fn encode(&self) -> Vec<u8> {
        let mut s = format!(
            "replicator-s3 claim v1\ngeneration {}\nend {}\n",
            self.gen_, self.end
        );
        s.push_str(&checkpoint_lines(&self.checkpoint));
        for k in &self.kept {
            s.push_str(&format!("segment {} {} {}\n", k.base, k.gen_, k.cut));
        }
        seal(s)
    }

    pub fn decode(bytes: &[u8]) -> Result<Claim, String> {
        let lines = open(bytes, "replicator-s3 claim v1")?;
        let mut end = None;
        let mut kept = Vec::new();
        let (gen_, checkpoint) = parse_lines(&lines, |word, args| match word {
            "end" => {
                end = Some(field(args.first().copied(), "end")?);
                Ok(true)
            }
            "segment" => {
                kept.push(Kept {
                    base: field(args.first().copied(), "segment base")?,
                    gen_: field(args.get(1).copied(), "segment generation")?,
                    cut: field(args.get(2).copied(), "segment cut")?,
                });
                Ok(true)
            }
            _ => Ok(false),
        })?;
        Ok(Claim {
            gen_,
            end: end.ok_or("no end line")?,
            checkpoint,
            kept,
        })
    }
}

pub fn encode_checkpoint(gen_: u64, c: &Checkpoint) -> Vec<u8> {
    seal(format!(
        "replicator-s3 checkpoint v1\ngeneration {gen_}\n{}",
        checkpoint_lines(c)
    ))
}

pub fn decode_checkpoint(bytes: &[u8]) -> Result<(u64, Checkpoint), String> {
    let lines = open(bytes, "replicator-s3 checkpoint v1")?;
    parse_lines(&lines, |_, _| Ok(false))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_foreign_keys_are_unknown() {
        let p = partition_prefix("node-1/", "orders", 3);
        assert_eq!(p, "node-1/orders/3/");
        assert_eq!(parse_key(&p, &fence_key(&p, 7)), Name::Fence(7));
        assert_eq!(parse_key(&p, &claim_key(&p, 7)), Name::Claim(7));
        assert_eq!(
            parse_key(&p, &checkpoint_key(&p, 7, 2)),
            Name::Checkpoint { gen_: 7, seq: 2 }
        );
        assert_eq!(
            parse_key(&p, &segment_key(&p, 120, 7)),
            Name::Segment { base: 120, gen_: 7 }
        );
        for foreign in [
            "node-1/orders/3/seg/12-7",
            "node-1/orders/3/notes.txt",
            "node-1/orders/31/gen/00000000000000000001",
            "node-2/orders/3/gen/00000000000000000001",
        ] {
            assert_eq!(parse_key(&p, foreign), Name::Unknown, "{foreign}");
        }
    }

    #[test]
    fn control_objects_round_trip_and_damage_is_detected() {
        let claim = Claim {
            gen_: 4,
            end: 900,
            checkpoint: Checkpoint {
                log_start: 10,
                hw: 850,
                epochs: vec![(1, 0), (3, 400)],
            },
            kept: vec![
                Kept {
                    base: 0,
                    gen_: 1,
                    cut: 500,
                },
                Kept {
                    base: 500,
                    gen_: 3,
                    cut: 900,
                },
            ],
        };
        let bytes = claim.encode();
        assert_eq!(Claim::decode(&bytes), Ok(claim.clone()));
        let mut damaged = bytes.clone();
        let at = damaged.len() / 2;
        damaged[at] ^= 1;
        assert!(
            Claim::decode(&damaged)
                .unwrap_err()
                .contains("CRC mismatch")
        );
        assert!(Claim::decode(&bytes[..bytes.len() - 4]).is_err());
        let c = encode_checkpoint(4, &claim.checkpoint);
        assert_eq!(decode_checkpoint(&c), Ok((4, claim.checkpoint.clone())));
        // A checkpoint is not a claim.
        assert!(Claim::decode(&c).is_err());
    }
}
