//! A storage plugin that misbehaves on purpose, for the host's containment
//! tests. It works as an in-memory log until the operation named by its
//! `mode` setting, which then:
//! - `loop`: spins forever in wasm (epoch deadline),
//! - `sleep`: blocks in a host call for an hour (host-side timeout),
//! - `grow`: allocates without bound (memory limit),
//! - `write-loop`: writes 16 MiB at a time to a file in its data directory,
//!   forever (the host writes at most a few MiB per call, inline),
//! - `trap`: hits `unreachable`,
//! - `stack`: recurses without bound (wasm stack limit),
//! - `lie-append`: acknowledges appends with a wrong log end offset,
//! - `lie-read`: returns batches whose CRC does not match,
//! - `relabel-read`: answers a read past the first batch with the first
//!   batch's bytes, its base offset overwritten with the one asked for
//!   (an index that serves the wrong batch under the right label),
//! - `corrupt-read`: answers every read with `corrupt` (its own index
//!   names a segment that is gone),
//! - `lie-bounds`: reports a log start past the log end,
//! - `huge-bounds`: reports a log ending past the offset space,
//! - `accept-gaps`: accepts appends at any base offset,
//! - `huge-epoch`: reports an epoch cache whose epoch no partition can
//!   reach (`u32::MAX`),
//! - `fail-after-append`: stores an append, then answers `io` (an index
//!   updated before a sync failed),
//! - `over-truncate`: truncates everything, whatever offset it is asked,
//! - `connect:PORT`: tries a TCP connection to 127.0.0.1:PORT,
//! - `read-file:PATH`: tries to read a file outside its data directory;
//!   these two answer `io` with the sandbox's refusal, or `other` if they
//!   got through.
//!
//! `mode = trap-open` traps while opening.

use std::cell::RefCell;

use replicator_plugin_sdk::BatchHeader;
use replicator_plugin_sdk::index::{self, Entry, OffsetIndex};

wit_bindgen::generate!({ world: "storage-plugin", path: "../../wit" });

use exports::replicator::plugin::storage::{EpochEntry, Guest, GuestPartitionLog, PartitionLog};
use replicator::plugin::types::{OffsetBounds, PluginError};

struct Plugin;

impl Guest for Plugin {
    type PartitionLog = Hostile;
}

struct Hostile {
    mode: String,
    index: RefCell<OffsetIndex<Vec<u8>>>,
}

// Deliberate: the test needs a stack overflow.
#[allow(unconditional_recursion)]
#[inline(never)]
fn recurse(n: u64, sink: &mut [u64; 64]) -> u64 {
    sink[(n % 64) as usize] = n;
    let more = recurse(n + 1, sink);
    more.wrapping_add(sink[(n % 7) as usize])
}

fn misbehave(mode: &str) {
    match mode {
        "loop" => {
            let mut x = 0u64;
            loop {
                x = std::hint::black_box(x.wrapping_add(1));
            }
        }
        "sleep" => {
            let p = wasip2::clocks::monotonic_clock::subscribe_duration(3_600_000_000_000);
            p.block();
        }
        "grow" => {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                hoard.push(vec![1u8; 1 << 20]);
                std::hint::black_box(&hoard);
            }
        }
        "trap" => std::process::abort(),
        "stack" => {
            let mut sink = [0u64; 64];
            std::hint::black_box(recurse(0, &mut sink));
        }
        _ => {}
    }
}

/// Overwrite the start of `flood` in the data directory with 16 MiB per
/// call, forever. Returns only if the file cannot be written, with why.
fn write_forever() -> String {
    use wasip2::filesystem::types::{DescriptorFlags, OpenFlags, PathFlags};
    let Some((dir, _)) = wasip2::filesystem::preopens::get_directories()
        .into_iter()
        .next()
    else {
        return "no data directory".into();
    };
    let file = match dir.open_at(
        PathFlags::empty(),
        "flood",
        OpenFlags::CREATE,
        DescriptorFlags::READ | DescriptorFlags::WRITE,
    ) {
        Ok(f) => f,
        Err(e) => return format!("open flood: {e}"),
    };
    let buf = vec![7u8; 16 << 20];
    loop {
        if let Err(e) = file.write(&buf, 0) {
            return format!("write flood: {e}");
        }
    }
}

/// Attempt a TCP connection through wasi:sockets; the sandbox should refuse.
fn try_connect(port: &str) -> PluginError {
    use wasip2::sockets::network::{IpAddressFamily, IpSocketAddress, Ipv4SocketAddress};
    let Ok(port) = port.parse::<u16>() else {
        return PluginError::InvalidInput(format!("bad port {port}"));
    };
    let network = wasip2::sockets::instance_network::instance_network();
    let socket = match wasip2::sockets::tcp_create_socket::create_tcp_socket(IpAddressFamily::Ipv4)
    {
        Ok(s) => s,
        Err(e) => return PluginError::Io(format!("create socket: {e:?}")),
    };
    let addr = IpSocketAddress::Ipv4(Ipv4SocketAddress {
        port,
        address: (127, 0, 0, 1),
    });
    if let Err(e) = socket.start_connect(&network, addr) {
        return PluginError::Io(format!("connect: {e:?}"));
    }
    socket.subscribe().block();
    match socket.finish_connect() {
        Ok(_) => PluginError::Other("connected".into()),
        Err(e) => PluginError::Io(format!("connect: {e:?}")),
    }
}

impl GuestPartitionLog for Hostile {
    fn open(
        _topic: String,
        _partition: u32,
        config: Vec<(String, String)>,
    ) -> Result<PartitionLog, PluginError> {
        let mode = config
            .iter()
            .find(|(k, _)| k == "mode")
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        if mode == "trap-open" {
            misbehave("trap");
        }
        Ok(PartitionLog::new(Hostile {
            mode,
            index: RefCell::new(OffsetIndex::empty_at(0)),
        }))
    }

    fn append(&self, batch: Vec<u8>) -> Result<u64, PluginError> {
        misbehave(&self.mode);
        if let Some(port) = self.mode.strip_prefix("connect:") {
            return Err(try_connect(port));
        }
        if self.mode == "write-loop" {
            return Err(PluginError::Io(write_forever()));
        }
        if let Some(path) = self.mode.strip_prefix("read-file:") {
            return Err(match std::fs::read(path) {
                Ok(b) => PluginError::Other(format!("read {} bytes of {path}", b.len())),
                Err(e) => PluginError::Io(format!("read {path}: {e}")),
            });
        }
        let h = BatchHeader::parse(&batch).map_err(|e| PluginError::InvalidInput(e.to_string()))?;
        let mut ix = self.index.borrow_mut();
        if h.base_offset != ix.log_end() && self.mode != "accept-gaps" {
            return Err(PluginError::Conflict("not at log end".into()));
        }
        if self.mode == "accept-gaps" {
            // Pretend to store it without keeping offsets straight.
            return Ok(h.next_offset());
        }
        ix.push(Entry {
            base: h.base_offset,
            next: h.next_offset(),
            leader_epoch: h.leader_epoch,
            len: h.batch_len,
            loc: batch,
        });
        if self.mode == "lie-append" {
            return Ok(ix.log_end() + 1000);
        }
        if self.mode == "fail-after-append" {
            return Err(PluginError::Io("syncing the directory failed".into()));
        }
        Ok(ix.log_end())
    }

    fn read(&self, offset: u64, max_bytes: u32) -> Result<Vec<u8>, PluginError> {
        if self.mode == "corrupt-read" {
            return Err(PluginError::Corrupt(
                "the index points at a missing segment".into(),
            ));
        }
        let ix = self.index.borrow();
        let range = ix
            .read_range(offset, max_bytes)
            .map_err(|_: index::OutOfRange| {
                PluginError::OffsetOutOfRange(OffsetBounds {
                    log_start: ix.log_start(),
                    log_end: ix.log_end(),
                })
            })?;
        if self.mode == "relabel-read"
            && offset > ix.log_start()
            && let Some(first) = ix.get(0)
        {
            let mut out = first.loc.clone();
            out[0..8].copy_from_slice(&offset.to_le_bytes());
            return Ok(out);
        }
        let mut out = Vec::new();
        for i in range {
            if let Some(e) = ix.get(i) {
                out.extend_from_slice(&e.loc);
            }
        }
        if self.mode == "lie-read" && out.len() > 50 {
            out[50] ^= 0xff;
        }
        Ok(out)
    }

    fn bounds(&self) -> OffsetBounds {
        let ix = self.index.borrow();
        if self.mode == "lie-bounds" {
            return OffsetBounds {
                log_start: ix.log_end() + 10,
                log_end: ix.log_end(),
            };
        }
        if self.mode == "huge-bounds" {
            return OffsetBounds {
                log_start: u64::MAX - 1,
                log_end: u64::MAX - 1,
            };
        }
        OffsetBounds {
            log_start: ix.log_start(),
            log_end: ix.log_end(),
        }
    }

    fn truncate(&self, offset: u64) -> Result<u64, PluginError> {
        let mut ix = self.index.borrow_mut();
        if self.mode == "over-truncate" {
            let start = ix.log_start();
            ix.truncate(start);
            return Ok(ix.log_end());
        }
        ix.truncate(offset);
        Ok(ix.log_end())
    }

    fn delete_prefix(&self, offset: u64) -> Result<(), PluginError> {
        self.index.borrow_mut().delete_prefix(offset);
        Ok(())
    }

    fn reset(&self, offset: u64) -> Result<(), PluginError> {
        *self.index.borrow_mut() = OffsetIndex::empty_at(offset);
        Ok(())
    }

    fn high_watermark(&self) -> Result<u64, PluginError> {
        Ok(0)
    }

    fn set_high_watermark(&self, _offset: u64) -> Result<(), PluginError> {
        Ok(())
    }

    fn leader_epochs(&self) -> Result<Vec<EpochEntry>, PluginError> {
        if self.mode == "huge-epoch" {
            return Ok(vec![EpochEntry {
                epoch: u32::MAX,
                start_offset: 0,
            }]);
        }
        Ok(Vec::new())
    }

    fn set_leader_epochs(&self, _entries: Vec<EpochEntry>) -> Result<(), PluginError> {
        Ok(())
    }

    fn flush(&self) -> Result<(), PluginError> {
        Ok(())
    }
}

export!(Plugin);
