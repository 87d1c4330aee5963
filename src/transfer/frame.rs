//! Binary data frames: `[transfer id: u32 BE][offset: u64 BE][payload]`.
//!
//! Every frame says which request it answers and where its bytes belong in the file, so the
//! receiver never depends on arrival order and drops bytes of a request it no longer wants.

use super::{TransferError, TransferId};

pub const HEADER_LEN: usize = 12;

/// The header bytes for a frame of `transfer` at file `offset`.
pub fn header(transfer: TransferId, offset: u64) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..4].copy_from_slice(&transfer.0.to_be_bytes());
    h[4..].copy_from_slice(&offset.to_be_bytes());
    h
}

/// Header and payload in one buffer, ready to send.
pub fn encode(transfer: TransferId, offset: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&header(transfer, offset));
    out.extend_from_slice(payload);
    out
}

/// Parses a header; the payload is `bytes[HEADER_LEN..]`.
pub fn decode_header(bytes: &[u8]) -> Result<(TransferId, u64), TransferError> {
    let Some(h) = bytes.get(..HEADER_LEN) else {
        return Err(TransferError::ShortFrame(bytes.len()));
    };
    let mut transfer = [0u8; 4];
    transfer.copy_from_slice(&h[..4]);
    let mut offset = [0u8; 8];
    offset.copy_from_slice(&h[4..]);
    Ok((
        TransferId(u32::from_be_bytes(transfer)),
        u64::from_be_bytes(offset),
    ))
}

/// The `(offset, len)` of each frame that covers `[start, end)` in `chunk`-sized pieces.
pub fn chunks(start: u64, end: u64, chunk: usize) -> impl Iterator<Item = (u64, usize)> {
    let chunk = chunk.max(1) as u64;
    let len = end.saturating_sub(start);
    (0..len.div_ceil(chunk)).map(move |i| {
        let offset = start + i * chunk;
        (offset, (end - offset).min(chunk) as usize)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let f = encode(TransferId(0xdead_beef), 0x0102_0304_0506_0708, b"payload");
        assert_eq!(f.len(), HEADER_LEN + 7);
        assert_eq!(&f[..4], &[0xde, 0xad, 0xbe, 0xef]);
        let (transfer, offset) = decode_header(&f).unwrap();
        assert_eq!(transfer, TransferId(0xdead_beef));
        assert_eq!(offset, 0x0102_0304_0506_0708);
        assert_eq!(&f[HEADER_LEN..], b"payload");
    }

    #[test]
    fn short_frames_are_errors() {
        assert_eq!(decode_header(&[1, 2, 3]), Err(TransferError::ShortFrame(3)));
        assert!(decode_header(&header(TransferId(1), 2)).is_ok());
    }

    #[test]
    fn chunks_cover_exactly() {
        assert_eq!(chunks(0, 0, 10).count(), 0);
        assert_eq!(chunks(0, 1, 10).collect::<Vec<_>>(), vec![(0, 1)]);
        assert_eq!(chunks(0, 10, 10).collect::<Vec<_>>(), vec![(0, 10)]);
        assert_eq!(
            chunks(100, 125, 10).collect::<Vec<_>>(),
            vec![(100, 10), (110, 10), (120, 5)]
        );
        let total: usize = chunks(7, 1_000_010, 4096).map(|(_, l)| l).sum();
        assert_eq!(total, 1_000_003);
    }
}
