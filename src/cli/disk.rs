//! The receiving CLI's files: the transfer engine's storage traits on plain files.
//!
//! A download lives in `DIR/.beamdrop/<resume key>.part` next to its record
//! (`<resume key>.record`) until it is whole and verified; then it moves to its own path under
//! `DIR`. Run again after a break, the record says which blocks are already good.

use crate::transfer::incoming::Storage;
use crate::transfer::sink::{DataStore, RecordStore};
use crate::transfer::TransferError;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// The folder of partial downloads inside the target folder.
pub const PARTIAL_DIR: &str = ".beamdrop";

fn storage(e: std::io::Error) -> TransferError {
    TransferError::Storage(e.to_string())
}

pub struct DiskData(File);
pub struct DiskRecord(File);

/// Opens (or creates) the partial file and record of `key` under `dir`.
pub fn open(dir: &Path, key: &str) -> std::io::Result<(DiskData, DiskRecord)> {
    let partial = dir.join(PARTIAL_DIR);
    std::fs::create_dir_all(&partial)?;
    let open = |name: String| {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(partial.join(name))
    };
    Ok((
        DiskData(open(format!("{key}.part"))?),
        DiskRecord(open(format!("{key}.record"))?),
    ))
}

/// Moves the finished download `key` to `segments` (already made safe) under `dir`, with
/// " (1)", " (2)"… before the extension if a file of that name is there; returns where it went.
pub fn finish(dir: &Path, key: &str, segments: &[String]) -> std::io::Result<PathBuf> {
    let partial = dir.join(PARTIAL_DIR);
    let mut target = dir.to_path_buf();
    for s in segments {
        target.push(s);
    }
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let target = free_name(&target);
    std::fs::rename(partial.join(format!("{key}.part")), &target)?;
    std::fs::remove_file(partial.join(format!("{key}.record")))?;
    // Left only if other downloads are still partial.
    let _ = std::fs::remove_dir(&partial);
    Ok(target)
}

fn free_name(path: &Path) -> PathBuf {
    if !path.exists() {
        return path.to_path_buf();
    }
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let ext = path
        .extension()
        .map(|e| format!(".{}", e.to_string_lossy()))
        .unwrap_or_default();
    (1..)
        .map(|n| path.with_file_name(format!("{stem} ({n}){ext}")))
        .find(|p| !p.exists())
        .unwrap_or_else(|| path.to_path_buf())
}

impl Storage for DiskData {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), TransferError> {
        self.0.write_all_at(data, offset).map_err(storage)
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), TransferError> {
        self.0.read_exact_at(buf, offset).map_err(storage)
    }
}

impl DataStore for DiskData {
    fn stored_len(&mut self) -> Result<u64, TransferError> {
        Ok(self.0.metadata().map_err(storage)?.len())
    }
    fn truncate(&mut self, len: u64) -> Result<(), TransferError> {
        self.0.set_len(len).map_err(storage)
    }
}

impl RecordStore for DiskRecord {
    fn read_all(&mut self) -> Result<Vec<u8>, TransferError> {
        let mut bytes = Vec::new();
        self.0.seek(SeekFrom::Start(0)).map_err(storage)?;
        self.0.read_to_end(&mut bytes).map_err(storage)?;
        Ok(bytes)
    }
    fn reset(&mut self, header: &[u8]) -> Result<(), TransferError> {
        self.0.set_len(0).map_err(storage)?;
        self.0.seek(SeekFrom::Start(0)).map_err(storage)?;
        self.0.write_all(header).map_err(storage)
    }
    fn append(&mut self, entry: &[u8]) -> Result<(), TransferError> {
        self.0.seek(SeekFrom::End(0)).map_err(storage)?;
        self.0.write_all(entry).map_err(storage)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_finished_file_takes_a_free_name_and_leaves_no_partial_folder() {
        let dir = tempdir();
        std::fs::write(dir.join("a.txt"), b"old").expect("write");
        let (mut data, mut record) = open(&dir, "k1").expect("open");
        data.write_at(0, b"new").expect("write");
        record.reset(b"header").expect("record");
        drop((data, record));
        let to = finish(&dir, "k1", &["a.txt".into()]).expect("finish");
        assert_eq!(to, dir.join("a (1).txt"));
        assert_eq!(std::fs::read(&to).expect("read"), b"new");
        assert_eq!(std::fs::read(dir.join("a.txt")).expect("read"), b"old");
        assert!(!dir.join(PARTIAL_DIR).exists());
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn a_record_is_read_back_as_written() {
        let dir = tempdir();
        let (_, mut record) = open(&dir, "k2").expect("open");
        record.reset(b"head").expect("reset");
        record.append(b"-one").expect("append");
        assert_eq!(record.read_all().expect("read"), b"head-one");
        record.reset(b"again").expect("reset");
        assert_eq!(record.read_all().expect("read"), b"again");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    fn tempdir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("beamdrop-disk-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        dir
    }
}
