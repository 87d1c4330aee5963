//! The receiver's disk side, as plain Rust: what the browser runs in a dedicated Worker (bytes
//! written to OPFS through synchronous access handles, hashed there, off the page's main thread)
//! and, with memory instead of disk, on the page itself when no worker or OPFS is available.
//!
//! The page hands it every data frame untouched (transferred, not copied) and the few control
//! messages that concern storage ([`SinkCmd`], JSON); it answers with [`SinkEvent`]s. Files are
//! addressed by their resume key (see [`super::record::resume_key`]); frames by the transfer id
//! they carry, which the page binds to a file before it sends the request ([`SinkCmd::Begin`]).

use super::blocks::{BlockHash, Layout};
use super::incoming::{BlockEvent, Incoming, Storage};
use super::record::{self, RecordHeader};
use super::{frame, ByteRange, TransferError, TransferId};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// Page → sink.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum SinkCmd {
    /// Open (or create) the partial file `key` of share `share`; answered with
    /// [`SinkEvent::Opened`] (or [`SinkEvent::Failed`]).
    Open {
        share: String,
        key: String,
        name: String,
        size: u64,
    },
    /// Frames of `transfer` belong to `key` from now on.
    Begin { key: String, transfer: TransferId },
    /// The sender's hash of block `index` of `transfer`'s file.
    Expect {
        transfer: TransferId,
        index: u32,
        hash: BlockHash,
    },
    /// The sender has sent all of `transfer`: check the whole file if every block is in.
    End {
        transfer: TransferId,
        size: u64,
        hash: BlockHash,
    },
    /// Frames of `transfer` are not wanted any more (cancelled, or its connection is gone).
    Forget { transfer: TransferId },
    /// Release `key`'s files, keeping them for later (paused, or the page is going away).
    Close { key: String },
    /// Delete `key`'s files (in share `share`'s folder).
    Discard { share: String, key: String },
}

/// Sink → page.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum SinkEvent {
    /// `key` is open; `verified` bytes of it were already verified (an earlier session), and
    /// these ranges are still missing.
    Opened {
        key: String,
        verified: u64,
        missing: Vec<ByteRange>,
    },
    /// A block of `transfer` verified: `stored` bytes of this transfer and `verified` bytes of
    /// the file are on disk and checked.
    Stored {
        transfer: TransferId,
        key: String,
        stored: u64,
        verified: u64,
    },
    /// A block of `transfer` did not match its hash and was dropped: request it again.
    Bad {
        transfer: TransferId,
        key: String,
        range: ByteRange,
    },
    /// `transfer` ended (the sink has taken all its frames) but blocks are missing: a bad one is
    /// being fetched again, or frames were lost with a connection.
    Incomplete {
        key: String,
        transfer: TransferId,
        missing: Vec<ByteRange>,
    },
    /// `key` is whole and its hash is the sender's; its files are closed, ready to be saved,
    /// or already `in_place`: written straight into the folder the person picked (said by the
    /// browser's storage worker; the sink itself always says `false`).
    Finished {
        key: String,
        hash: BlockHash,
        #[serde(default)]
        in_place: bool,
    },
    /// The whole file did not hash to the sender's value although every block matched the
    /// hashes sent for it: blocks kept from an earlier session came from another file. All of
    /// it was dropped; request it again. Said at the end of `transfer`.
    Changed { key: String, transfer: TransferId },
    /// Storage failed for `key`; it was closed.
    Failed { key: String, message: String },
}

/// A record file, append-only (see [`super::record`]).
pub trait RecordStore {
    fn read_all(&mut self) -> Result<Vec<u8>, TransferError>;
    /// Empties the record and starts it with `header`.
    fn reset(&mut self, header: &[u8]) -> Result<(), TransferError>;
    fn append(&mut self, entry: &[u8]) -> Result<(), TransferError>;
}

/// A file's bytes, which can also say how many there are.
pub trait DataStore: Storage {
    /// How many bytes the file holds now.
    fn stored_len(&mut self) -> Result<u64, TransferError>;
    fn truncate(&mut self, len: u64) -> Result<(), TransferError>;
}

struct Open<D, R> {
    incoming: Incoming,
    header: RecordHeader,
    data: D,
    record: R,
}

/// Every file the sink holds open, and which transfer feeds which file.
pub struct Sink<D, R> {
    files: HashMap<String, Open<D, R>>,
    transfers: HashMap<TransferId, (String, u64)>,
    block: u64,
}

impl<D: DataStore, R: RecordStore> Sink<D, R> {
    pub fn new(block: u64) -> Self {
        Self {
            files: HashMap::new(),
            transfers: HashMap::new(),
            block,
        }
    }

    /// Adopts the freshly opened files of `key`: resumes from the record if it is this file's
    /// and the bytes it vouches for are on disk, else starts over.
    pub fn attach(
        &mut self,
        key: &str,
        name: &str,
        size: u64,
        mut data: D,
        mut record: R,
    ) -> Result<SinkEvent, TransferError> {
        let layout = Layout::with_block(size, self.block);
        let header = RecordHeader {
            key: key.to_owned(),
            name: name.to_owned(),
            size,
            block: self.block,
        };
        let stored_len = data.stored_len()?;
        let kept = record::decode(&record.read_all()?)
            .ok()
            .and_then(|(h, entries)| {
                let on_disk = entries
                    .iter()
                    .all(|&(index, _)| layout.range(index).1 <= stored_len);
                (h == header && on_disk).then_some(entries)
            });
        let incoming = match kept {
            Some(entries) => Incoming::resume(layout, entries),
            None => {
                data.truncate(0)?;
                record.reset(&record::encode_header(&header))?;
                Incoming::new(layout)
            }
        };
        let event = SinkEvent::Opened {
            key: key.to_owned(),
            verified: incoming.verified_bytes(),
            missing: incoming.missing(),
        };
        self.files.insert(
            key.to_owned(),
            Open {
                incoming,
                header,
                data,
                record,
            },
        );
        Ok(event)
    }

    /// Whether `key` is open here.
    pub fn is_open(&self, key: &str) -> bool {
        self.files.contains_key(key)
    }

    /// Where an open file stands, as [`SinkEvent::Opened`] (the answer to a second `Open`).
    pub fn status(&mut self, key: &str) -> Option<SinkEvent> {
        let f = self.files.get_mut(key)?;
        // Partial blocks are asked for again from their start by the next request.
        f.incoming.forget_partial();
        Some(SinkEvent::Opened {
            key: key.to_owned(),
            verified: f.incoming.verified_bytes(),
            missing: f.incoming.missing(),
        })
    }

    /// Handles a command (every one but [`SinkCmd::Open`], which needs the browser's async file
    /// system first and ends in [`Sink::attach`]). [`SinkCmd::Close`] and [`SinkCmd::Discard`]
    /// hand back the files for the caller to close or delete.
    pub fn command(&mut self, cmd: SinkCmd) -> (Vec<SinkEvent>, Option<(D, R)>) {
        let mut events = Vec::new();
        let mut released = None;
        match cmd {
            SinkCmd::Open { .. } => {}
            SinkCmd::Begin { key, transfer } => {
                // Blocks half-received from an earlier request are forgotten when the page
                // reopens the file (`status`), not here: a re-request of a bad block runs
                // alongside the request still under way.
                if self.files.contains_key(&key) {
                    self.transfers.insert(transfer, (key, 0));
                }
            }
            SinkCmd::Expect {
                transfer,
                index,
                hash,
            } => {
                if let Some(key) = self.transfers.get(&transfer).map(|(k, _)| k.clone()) {
                    let settled = self
                        .files
                        .get_mut(&key)
                        .map(|f| f.incoming.expect(index, hash));
                    match settled {
                        Some(Ok(Some(event))) => {
                            events.extend(self.settled(transfer, &key, event));
                        }
                        Some(Err(e)) => events.push(self.fail(&key, &e)),
                        _ => {}
                    }
                }
            }
            SinkCmd::End {
                transfer,
                size,
                hash,
            } => {
                if let Some((key, _)) = self.transfers.remove(&transfer) {
                    events.extend(self.end(&key, transfer, size, hash));
                }
            }
            SinkCmd::Forget { transfer } => {
                self.transfers.remove(&transfer);
            }
            SinkCmd::Close { key } | SinkCmd::Discard { key, .. } => {
                self.transfers.retain(|_, (k, _)| *k != key);
                released = self.files.remove(&key).map(|f| (f.data, f.record));
            }
        }
        (events, released)
    }

    /// The end of a transfer of `key`: the whole file is checked once every block is in.
    fn end(
        &mut self,
        key: &str,
        transfer: TransferId,
        size: u64,
        hash: BlockHash,
    ) -> Vec<SinkEvent> {
        let Some(f) = self.files.get_mut(key) else {
            return Vec::new();
        };
        match f.incoming.check(size, hash) {
            Ok(()) => vec![SinkEvent::Finished {
                key: key.to_owned(),
                hash,
                in_place: false,
            }],
            Err(TransferError::Incomplete { .. }) => vec![SinkEvent::Incomplete {
                key: key.to_owned(),
                transfer,
                missing: f.incoming.missing(),
            }],
            Err(TransferError::Integrity) => {
                f.incoming.forget_all();
                let reset = f
                    .record
                    .reset(&record::encode_header(&f.header))
                    .and_then(|()| f.data.truncate(0));
                match reset {
                    Ok(()) => vec![SinkEvent::Changed {
                        key: key.to_owned(),
                        transfer,
                    }],
                    Err(e) => vec![self.fail(key, &e)],
                }
            }
            Err(e) => vec![self.fail(key, &e)],
        }
    }

    /// One binary frame from the channel. Frames of unknown or forgotten transfers are dropped;
    /// a frame the file refuses (overlap, out of bounds) changes nothing.
    pub fn frame(&mut self, bytes: &[u8]) -> Vec<SinkEvent> {
        let Ok((transfer, offset)) = frame::decode_header(bytes) else {
            return Vec::new();
        };
        let Some(key) = self.transfers.get(&transfer).map(|(k, _)| k.clone()) else {
            return Vec::new();
        };
        let Some(f) = self.files.get_mut(&key) else {
            return Vec::new();
        };
        match f
            .incoming
            .write(&mut f.data, offset, &bytes[frame::HEADER_LEN..])
        {
            Ok(Some(event)) => self.settled(transfer, &key, event),
            Ok(None) => Vec::new(),
            Err(TransferError::Storage(message)) => {
                vec![self.fail(&key, &TransferError::Storage(message))]
            }
            // A stray frame (a duplicate, or out of the file): nothing was written.
            Err(_) => Vec::new(),
        }
    }

    fn settled(&mut self, transfer: TransferId, key: &str, event: BlockEvent) -> Vec<SinkEvent> {
        let Some(f) = self.files.get_mut(key) else {
            return Vec::new();
        };
        let layout = f.incoming.layout();
        match event {
            BlockEvent::Verified { index, hash } => {
                if let Err(e) = f.record.append(&record::encode_entry(index, &hash)) {
                    return vec![self.fail(key, &e)];
                }
                let verified = f.incoming.verified_bytes();
                let stored = self.transfers.get_mut(&transfer).map(|(_, stored)| {
                    *stored += layout.len(index);
                    *stored
                });
                vec![SinkEvent::Stored {
                    transfer,
                    key: key.to_owned(),
                    stored: stored.unwrap_or(0),
                    verified,
                }]
            }
            BlockEvent::Bad { index } => vec![SinkEvent::Bad {
                transfer,
                key: key.to_owned(),
                range: layout.range(index),
            }],
        }
    }

    /// Stops feeding `key` after a storage error; the page releases its files with
    /// [`SinkCmd::Close`] (what was verified stays for a later attempt).
    fn fail(&mut self, key: &str, e: &TransferError) -> SinkEvent {
        self.transfers.retain(|_, (k, _)| k != key);
        SinkEvent::Failed {
            key: key.to_owned(),
            message: e.to_string(),
        }
    }

    /// Takes `key`'s files out of the sink (after [`SinkEvent::Finished`] or
    /// [`SinkEvent::Failed`]) so the caller can close them.
    pub fn take(&mut self, key: &str) -> Option<(D, R)> {
        self.transfers.retain(|_, (k, _)| k != key);
        self.files.remove(key).map(|f| (f.data, f.record))
    }
}

/// Memory-backed files: the page's fallback without OPFS, and tests.
pub mod memory {
    use super::super::incoming::{MemoryStorage, Storage};
    use super::super::TransferError;
    use super::{DataStore, RecordStore};

    /// A file's bytes in memory, allocated up front (bounded by [`MemoryStorage::MAX`]).
    pub struct MemoryData {
        pub storage: MemoryStorage,
        len: u64,
    }

    impl MemoryData {
        pub fn new(size: u64) -> Result<Self, TransferError> {
            Ok(Self {
                storage: MemoryStorage::new(size)?,
                len: 0,
            })
        }
    }

    impl Storage for MemoryData {
        fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), TransferError> {
            self.storage.write_at(offset, data)?;
            self.len = self.len.max(offset + data.len() as u64);
            Ok(())
        }
        fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), TransferError> {
            self.storage.read_at(offset, buf)
        }
    }

    impl DataStore for MemoryData {
        fn stored_len(&mut self) -> Result<u64, TransferError> {
            Ok(self.len)
        }
        fn truncate(&mut self, len: u64) -> Result<(), TransferError> {
            self.len = self.len.min(len);
            Ok(())
        }
    }

    /// A record kept in memory (lost with the page: no resume after a reload).
    #[derive(Default)]
    pub struct MemoryRecord {
        pub bytes: Vec<u8>,
    }

    impl RecordStore for MemoryRecord {
        fn read_all(&mut self) -> Result<Vec<u8>, TransferError> {
            Ok(self.bytes.clone())
        }
        fn reset(&mut self, header: &[u8]) -> Result<(), TransferError> {
            self.bytes = header.to_vec();
            Ok(())
        }
        fn append(&mut self, entry: &[u8]) -> Result<(), TransferError> {
            self.bytes.extend_from_slice(entry);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::blocks::{block_hash, file_hash};
    use super::memory::{MemoryData, MemoryRecord};
    use super::*;

    const BLOCK: u64 = 2048;

    fn data(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 % 251) as u8).collect()
    }

    /// Plays the sender for `transfer`: hash then frames of each block in `blocks`, then `End`.
    fn send<D: DataStore, R: RecordStore>(
        sink: &mut Sink<D, R>,
        src: &[u8],
        transfer: TransferId,
        blocks: impl IntoIterator<Item = u32>,
        corrupt: Option<u32>,
    ) -> Vec<SinkEvent> {
        let layout = Layout::with_block(src.len() as u64, BLOCK);
        let mut events = Vec::new();
        for index in blocks {
            let (s, e) = layout.range(index);
            let hash = block_hash(&layout, index, &src[s as usize..e as usize]);
            events.extend(
                sink.command(SinkCmd::Expect {
                    transfer,
                    index,
                    hash,
                })
                .0,
            );
            for (off, len) in frame::chunks(s, e, 700) {
                let mut payload = src[off as usize..off as usize + len].to_vec();
                if corrupt == Some(index) && off == s {
                    payload[0] ^= 1;
                }
                events.extend(sink.frame(&frame::encode(transfer, off, &payload)));
            }
        }
        events.extend(
            sink.command(SinkCmd::End {
                transfer,
                size: src.len() as u64,
                hash: file_hash(src),
            })
            .0,
        );
        events
    }

    fn open(
        sink: &mut Sink<MemoryData, MemoryRecord>,
        size: u64,
        data: MemoryData,
        record: MemoryRecord,
    ) -> SinkEvent {
        sink.attach("k", "f.bin", size, data, record).unwrap()
    }

    #[test]
    fn a_file_arrives_verified_block_by_block_and_finishes() {
        let src = data(5 * BLOCK as usize + 100);
        let size = src.len() as u64;
        let mut sink = Sink::new(BLOCK);
        let opened = open(
            &mut sink,
            size,
            MemoryData::new(size).unwrap(),
            MemoryRecord::default(),
        );
        assert_eq!(
            opened,
            SinkEvent::Opened {
                key: "k".into(),
                verified: 0,
                missing: vec![(0, size)]
            }
        );
        sink.command(SinkCmd::Begin {
            key: "k".into(),
            transfer: TransferId(1),
        });
        let events = send(&mut sink, &src, TransferId(1), 0..6, None);
        let stored: Vec<u64> = events
            .iter()
            .filter_map(|e| match e {
                SinkEvent::Stored { stored, .. } => Some(*stored),
                _ => None,
            })
            .collect();
        assert_eq!(stored, vec![2048, 4096, 6144, 8192, 10240, size]);
        assert_eq!(
            events.last(),
            Some(&SinkEvent::Finished {
                key: "k".into(),
                hash: file_hash(&src),
                in_place: false,
            })
        );
        let (data, _) = sink.take("k").unwrap();
        assert_eq!(data.storage.into_bytes(), src);
    }

    #[test]
    fn a_bad_block_is_reported_and_the_file_waits_for_it() {
        let src = data(3 * BLOCK as usize);
        let size = src.len() as u64;
        let mut sink = Sink::new(BLOCK);
        open(
            &mut sink,
            size,
            MemoryData::new(size).unwrap(),
            MemoryRecord::default(),
        );
        sink.command(SinkCmd::Begin {
            key: "k".into(),
            transfer: TransferId(1),
        });
        let events = send(&mut sink, &src, TransferId(1), 0..3, Some(1));
        assert!(events.contains(&SinkEvent::Bad {
            transfer: TransferId(1),
            key: "k".into(),
            range: (BLOCK, 2 * BLOCK)
        }));
        assert_eq!(
            events.last(),
            Some(&SinkEvent::Incomplete {
                key: "k".into(),
                transfer: TransferId(1),
                missing: vec![(BLOCK, 2 * BLOCK)]
            })
        );
        sink.command(SinkCmd::Begin {
            key: "k".into(),
            transfer: TransferId(2),
        });
        let events = send(&mut sink, &src, TransferId(2), [1], None);
        assert!(matches!(events.last(), Some(SinkEvent::Finished { .. })));
    }

    /// A store that can only be written, as a file streamed into a picked folder is until it is
    /// closed: it counts the bytes written and refuses every read.
    struct WriteOnly(MemoryData, u64);

    impl Storage for WriteOnly {
        fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), TransferError> {
            self.1 += data.len() as u64;
            self.0.write_at(offset, data)
        }
        fn read_at(&mut self, _: u64, _: &mut [u8]) -> Result<(), TransferError> {
            Err(TransferError::Storage("write-only".into()))
        }
    }

    impl DataStore for WriteOnly {
        fn stored_len(&mut self) -> Result<u64, TransferError> {
            Ok(0)
        }
        fn truncate(&mut self, _: u64) -> Result<(), TransferError> {
            Ok(())
        }
    }

    #[test]
    fn a_file_streamed_into_a_folder_is_verified_without_reading_anything_back() {
        let src = data(5 * BLOCK as usize + 99);
        let size = src.len() as u64;
        let mut sink = Sink::new(BLOCK);
        let store = WriteOnly(MemoryData::new(size).unwrap(), 0);
        sink.attach("k", "f.bin", size, store, MemoryRecord::default())
            .unwrap();
        sink.command(SinkCmd::Begin {
            key: "k".into(),
            transfer: TransferId(1),
        });
        // A corrupted block is caught from the bytes as they pass, and asked for again.
        let events = send(&mut sink, &src, TransferId(1), 0..6, Some(3));
        assert!(events.contains(&SinkEvent::Bad {
            transfer: TransferId(1),
            key: "k".into(),
            range: (3 * BLOCK, 4 * BLOCK)
        }));
        sink.command(SinkCmd::Begin {
            key: "k".into(),
            transfer: TransferId(2),
        });
        let events = send(&mut sink, &src, TransferId(2), [3], None);
        assert_eq!(
            events.last(),
            Some(&SinkEvent::Finished {
                key: "k".into(),
                hash: file_hash(&src),
                in_place: false,
            })
        );
        let (store, _) = sink.take("k").unwrap();
        // Every byte written once, the bad block twice: no read-back pass, no second copy.
        assert_eq!(store.1, size + BLOCK);
        assert_eq!(store.0.storage.into_bytes(), src);
    }

    #[test]
    fn a_record_resumes_a_file_and_a_foreign_one_starts_over() {
        let src = data(4 * BLOCK as usize);
        let size = src.len() as u64;
        let mut sink = Sink::new(BLOCK);
        open(
            &mut sink,
            size,
            MemoryData::new(size).unwrap(),
            MemoryRecord::default(),
        );
        sink.command(SinkCmd::Begin {
            key: "k".into(),
            transfer: TransferId(1),
        });
        // Two blocks, then the connection breaks (no End).
        let layout = Layout::with_block(size, BLOCK);
        for index in 0..2 {
            let (s, e) = layout.range(index);
            let hash = block_hash(&layout, index, &src[s as usize..e as usize]);
            sink.command(SinkCmd::Expect {
                transfer: TransferId(1),
                index,
                hash,
            });
            sink.frame(&frame::encode(
                TransferId(1),
                s,
                &src[s as usize..e as usize],
            ));
        }
        let (data, record) = sink.command(SinkCmd::Close { key: "k".into() }).1.unwrap();
        let kept = record.bytes.clone();

        // The page reloads: a new sink, the same files.
        let mut sink = Sink::new(BLOCK);
        let opened = open(
            &mut sink,
            size,
            data,
            MemoryRecord {
                bytes: kept.clone(),
            },
        );
        assert_eq!(
            opened,
            SinkEvent::Opened {
                key: "k".into(),
                verified: 2 * BLOCK,
                missing: vec![(2 * BLOCK, size)]
            }
        );
        sink.command(SinkCmd::Begin {
            key: "k".into(),
            transfer: TransferId(7),
        });
        let events = send(&mut sink, &src, TransferId(7), 2..4, None);
        assert!(matches!(events.last(), Some(SinkEvent::Finished { .. })));

        // A record whose bytes are not on disk any more (storage cleared) is not trusted.
        let mut sink = Sink::new(BLOCK);
        let opened = open(
            &mut sink,
            size,
            MemoryData::new(size).unwrap(),
            MemoryRecord {
                bytes: kept.clone(),
            },
        );
        assert!(matches!(opened, SinkEvent::Opened { verified: 0, .. }));
        // Nor is one for another size.
        let mut sink = Sink::new(BLOCK);
        let mut bigger = MemoryData::new(size + 1).unwrap();
        bigger.write_at(0, &src).unwrap();
        let opened = sink
            .attach("k", "f.bin", size + 1, bigger, MemoryRecord { bytes: kept })
            .unwrap();
        assert!(matches!(opened, SinkEvent::Opened { verified: 0, .. }));
    }

    #[test]
    fn blocks_from_another_file_are_caught_by_the_root_and_dropped() {
        let old = data(3 * BLOCK as usize);
        let mut new = old.clone();
        new[10] ^= 0xff; // block 0 differs
        let size = old.len() as u64;
        let mut sink = Sink::new(BLOCK);
        open(
            &mut sink,
            size,
            MemoryData::new(size).unwrap(),
            MemoryRecord::default(),
        );
        sink.command(SinkCmd::Begin {
            key: "k".into(),
            transfer: TransferId(1),
        });
        // Block 0 of the old file was received in an earlier session; the rest now, from `new`.
        send(&mut sink, &old, TransferId(1), [0], None);
        sink.command(SinkCmd::Begin {
            key: "k".into(),
            transfer: TransferId(2),
        });
        let events = send(&mut sink, &new, TransferId(2), [1, 2], None);
        assert_eq!(
            events.last(),
            Some(&SinkEvent::Changed {
                key: "k".into(),
                transfer: TransferId(2)
            })
        );
        sink.command(SinkCmd::Begin {
            key: "k".into(),
            transfer: TransferId(3),
        });
        let events = send(&mut sink, &new, TransferId(3), 0..3, None);
        assert!(matches!(events.last(), Some(SinkEvent::Finished { .. })));
    }

    #[test]
    fn frames_of_forgotten_or_unknown_transfers_are_dropped() {
        let src = data(BLOCK as usize);
        let size = src.len() as u64;
        let mut sink = Sink::new(BLOCK);
        open(
            &mut sink,
            size,
            MemoryData::new(size).unwrap(),
            MemoryRecord::default(),
        );
        assert!(sink
            .frame(&frame::encode(TransferId(9), 0, &src))
            .is_empty());
        sink.command(SinkCmd::Begin {
            key: "k".into(),
            transfer: TransferId(1),
        });
        sink.command(SinkCmd::Forget {
            transfer: TransferId(1),
        });
        assert!(sink
            .frame(&frame::encode(TransferId(1), 0, &src))
            .is_empty());
        assert!(sink.frame(&[1, 2, 3]).is_empty());
        // Nothing was written: the whole file is still missing.
        let (data, _) = sink.take("k").unwrap();
        assert_eq!(data.storage.into_bytes(), vec![0; BLOCK as usize]);
    }

    #[test]
    fn commands_and_events_read_as_json() {
        let cmd = SinkCmd::Begin {
            key: "k".into(),
            transfer: TransferId(3),
        };
        let text = serde_json::to_string(&cmd).unwrap();
        assert_eq!(text, r#"{"type":"begin","key":"k","transfer":3}"#);
        assert_eq!(serde_json::from_str::<SinkCmd>(&text).unwrap(), cmd);
        let ev = SinkEvent::Incomplete {
            key: "k".into(),
            transfer: TransferId(4),
            missing: vec![(0, 5)],
        };
        let text = serde_json::to_string(&ev).unwrap();
        assert_eq!(serde_json::from_str::<SinkEvent>(&text).unwrap(), ev);
    }
}
