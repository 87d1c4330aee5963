//! "Download all" as one ZIP, for browsers that cannot write into a chosen folder: the files are
//! already on disk (OPFS), so the archive is made of *parts* — header bytes written by the `zip`
//! crate, and references to the received files — that the page turns into one disk-backed
//! `Blob`. Nothing is held whole in memory; entries are stored (no compression: files worth
//! sending are mostly compressed already, and storing costs no CPU), ZIP64 above 4 GiB.
//!
//! The file bytes still pass through the `zip` writer once, in chunks, for their CRC-32; the
//! writer's output for them is dropped, since the `Blob` takes them from the files themselves.

use crate::transfer::paths;
use std::cell::{Cell, RefCell};
use std::io::Write;
use std::rc::Rc;
use zip::write::{SimpleFileOptions, StreamWriter};
use zip::{CompressionMethod, ZipWriter};

/// One piece of the archive, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    /// Bytes written by the ZIP writer (headers, descriptors, the central directory).
    Bytes(Vec<u8>),
    /// The whole content of the `n`th file added.
    File(usize),
}

#[derive(Debug, thiserror::Error)]
#[error("cannot build the ZIP: {0}")]
pub struct ArchiveError(String);

impl From<zip::result::ZipError> for ArchiveError {
    fn from(e: zip::result::ZipError) -> Self {
        Self(e.to_string())
    }
}

impl From<std::io::Error> for ArchiveError {
    fn from(e: std::io::Error) -> Self {
        Self(e.to_string())
    }
}

/// Collects what the writer writes; drops file data while `in_data` is set.
struct PartSink {
    parts: Rc<RefCell<Vec<Part>>>,
    in_data: Rc<Cell<bool>>,
}

impl Write for PartSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if !self.in_data.get() {
            let mut parts = self.parts.borrow_mut();
            match parts.last_mut() {
                Some(Part::Bytes(bytes)) => bytes.extend_from_slice(buf),
                _ => parts.push(Part::Bytes(buf.to_vec())),
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Builds an archive: [`ZipBuilder::add`] a file, feed its bytes with [`ZipBuilder::data`],
/// next file, then [`ZipBuilder::finish`].
pub struct ZipBuilder {
    zip: ZipWriter<StreamWriter<PartSink>>,
    parts: Rc<RefCell<Vec<Part>>>,
    in_data: Rc<Cell<bool>>,
    files: usize,
    /// Entry names used so far (two files may not share one).
    names: std::collections::HashSet<String>,
}

impl Default for ZipBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl ZipBuilder {
    pub fn new() -> Self {
        let parts = Rc::new(RefCell::new(Vec::new()));
        let in_data = Rc::new(Cell::new(false));
        let sink = PartSink {
            parts: parts.clone(),
            in_data: in_data.clone(),
        };
        Self {
            zip: ZipWriter::new_stream(sink),
            parts,
            in_data,
            files: 0,
            names: Default::default(),
        }
    }

    /// Starts the next file, stored under its sender-given `path` / `name` made safe (the
    /// reader's tools extract it inside the target folder). Its index in [`Part::File`] is the
    /// number of files added before it. Returns the entry's name.
    pub fn add(&mut self, path: &str, name: &str, size: u64) -> Result<String, ArchiveError> {
        self.in_data.set(false);
        let entry = self.unique(paths::display_path(path, name));
        let options = SimpleFileOptions::default()
            .compression_method(CompressionMethod::Stored)
            .large_file(size >= u64::from(u32::MAX));
        self.zip.start_file(entry.as_str(), options)?;
        self.parts.borrow_mut().push(Part::File(self.files));
        self.files += 1;
        self.in_data.set(true);
        Ok(entry)
    }

    /// The current file's next bytes (for its CRC; the archive takes them from the file).
    pub fn data(&mut self, chunk: &[u8]) -> Result<(), ArchiveError> {
        self.zip.write_all(chunk)?;
        Ok(())
    }

    /// Ends the archive: its parts, in order.
    pub fn finish(self) -> Result<Vec<Part>, ArchiveError> {
        self.in_data.set(false);
        // The writer (and with it the sink's handle on the parts) ends here.
        self.zip.finish()?;
        Ok(std::mem::take(&mut *self.parts.borrow_mut()))
    }

    /// `name`, or `name (2)`, `name (3)`… before the extension, whichever is free.
    fn unique(&mut self, name: String) -> String {
        let mut candidate = name.clone();
        let mut n = 2;
        while self.names.contains(&candidate) {
            candidate = match name.rsplit_once('.') {
                Some((stem, ext)) if !stem.is_empty() && !stem.ends_with('/') => {
                    format!("{stem} ({n}).{ext}")
                }
                _ => format!("{name} ({n})"),
            };
            n += 1;
        }
        self.names.insert(candidate.clone());
        candidate
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Cursor, Read, Seek, SeekFrom};

    fn files() -> Vec<(&'static str, &'static str, Vec<u8>)> {
        vec![
            ("album/deep/x.txt", "x.txt", b"deep file\n".to_vec()),
            (
                "album/one.bin",
                "one.bin",
                (0..300_000u32).map(|i| i as u8).collect(),
            ),
            ("", "empty.bin", Vec::new()),
            (
                "other/one.bin",
                "one.bin",
                b"same name, other folder".to_vec(),
            ),
            ("../../etc/passwd", "passwd", b"root:x:0:0".to_vec()),
            (
                "album/one.bin",
                "one.bin",
                b"a second file under the same path".to_vec(),
            ),
        ]
    }

    fn build(files: &[(&str, &str, Vec<u8>)]) -> (Vec<Part>, Vec<String>) {
        let mut zip = ZipBuilder::new();
        let mut names = Vec::new();
        for (path, name, bytes) in files {
            names.push(zip.add(path, name, bytes.len() as u64).unwrap());
            for chunk in bytes.chunks(65_536) {
                zip.data(chunk).unwrap();
            }
        }
        (zip.finish().unwrap(), names)
    }

    #[test]
    fn the_parts_with_the_files_put_in_are_a_zip_that_unpacks_to_the_tree() {
        let files = files();
        let (parts, names) = build(&files);
        assert_eq!(
            names,
            [
                "album/deep/x.txt",
                "album/one.bin",
                "empty.bin",
                "other/one.bin",
                "etc/passwd",
                "album/one (2).bin"
            ]
        );
        // Each file appears once, in order, between header bytes.
        let file_parts: Vec<usize> = parts
            .iter()
            .filter_map(|p| match p {
                Part::File(i) => Some(*i),
                _ => None,
            })
            .collect();
        assert_eq!(file_parts, (0..files.len()).collect::<Vec<_>>());
        let mut archive = Vec::new();
        for part in &parts {
            match part {
                Part::Bytes(b) => archive.extend_from_slice(b),
                Part::File(i) => archive.extend_from_slice(&files[*i].2),
            }
        }
        let mut zip = zip::ZipArchive::new(Cursor::new(archive)).unwrap();
        assert_eq!(zip.len(), files.len());
        for (i, (_, _, bytes)) in files.iter().enumerate() {
            let mut entry = zip.by_name(&names[i]).unwrap();
            assert_eq!(entry.compression(), CompressionMethod::Stored);
            let mut out = Vec::new();
            entry.read_to_end(&mut out).unwrap(); // checks the CRC too
            assert_eq!(&out, bytes, "{}", names[i]);
        }
    }

    /// A reader over parts where every file is `size` zero bytes, never materialised.
    struct Virtual {
        pieces: Vec<(u64, Option<Vec<u8>>, u64)>, // (start, bytes or None for zeros, len)
        len: u64,
        pos: u64,
    }

    impl Virtual {
        fn new(parts: &[Part], size: u64) -> Self {
            let mut pieces = Vec::new();
            let mut at = 0;
            for p in parts {
                let (bytes, len) = match p {
                    Part::Bytes(b) => (Some(b.clone()), b.len() as u64),
                    Part::File(_) => (None, size),
                };
                pieces.push((at, bytes, len));
                at += len;
            }
            Self {
                pieces,
                len: at,
                pos: 0,
            }
        }
    }

    impl Read for Virtual {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let Some((start, bytes, len)) = self
                .pieces
                .iter()
                .find(|(s, _, l)| self.pos >= *s && self.pos < s + l)
            else {
                return Ok(0);
            };
            let off = self.pos - start;
            let n = ((len - off) as usize).min(buf.len());
            match bytes {
                Some(b) => buf[..n].copy_from_slice(&b[off as usize..off as usize + n]),
                None => buf[..n].fill(0),
            }
            self.pos += n as u64;
            Ok(n)
        }
    }

    impl Seek for Virtual {
        fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
            self.pos = match to {
                SeekFrom::Start(n) => n,
                SeekFrom::End(d) => (self.len as i64 + d) as u64,
                SeekFrom::Current(d) => (self.pos as i64 + d) as u64,
            };
            Ok(self.pos)
        }
    }

    /// Over 4 GiB needs ZIP64 records; hashing 4 GiB is a second or two in release builds.
    #[test]
    #[cfg_attr(debug_assertions, ignore = "4 GiB of CRC: run with --release")]
    fn entries_over_4_gib_use_zip64() {
        let size = (4u64 << 30) + 1;
        let mut zip = ZipBuilder::new();
        zip.add("big/disk.img", "disk.img", size).unwrap();
        let zeros = vec![0u8; 1 << 20];
        let mut left = size;
        while left > 0 {
            let n = left.min(zeros.len() as u64) as usize;
            zip.data(&zeros[..n]).unwrap();
            left -= n as u64;
        }
        zip.add("", "after.txt", 0).unwrap();
        let parts = zip.finish().unwrap();
        // The second entry is empty, so every file part can read as `size` zeros... except it
        // must read as nothing: build the reader with one size per part instead.
        let parts: Vec<Part> = parts
            .into_iter()
            .filter(|p| !matches!(p, Part::File(1)))
            .collect();
        let mut archive = zip::ZipArchive::new(Virtual::new(&parts, size)).unwrap();
        let entry = archive.by_name("big/disk.img").unwrap();
        assert_eq!(entry.size(), size);
        drop(entry);
        assert_eq!(archive.by_name("after.txt").unwrap().size(), 0);
    }
}
