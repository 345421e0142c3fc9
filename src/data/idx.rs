//! The IDX file format of MNIST and Fashion-MNIST, gzip-compressed or plain.
//!
//! An IDX file is a 4-byte magic number (two zero bytes, a type code, the number of
//! dimensions), one big-endian u32 per dimension, then the values. Fashion-MNIST uses unsigned
//! bytes (type code 0x08): images have 3 dimensions (count, rows, columns), labels 1.

use std::io::Read;
use std::path::{Path, PathBuf};

/// What can be wrong with a data file. The message names the file and what is wrong; the
/// caller adds how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum IdxError {
    #[error("{path}: cannot read: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: corrupt or truncated gzip data ({source})")]
    Gzip {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {what}")]
    Format { path: PathBuf, what: String },
}

/// A parsed IDX file of unsigned bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdxArray {
    pub dims: Vec<usize>,
    pub values: Vec<u8>,
}

const UNSIGNED_BYTE: u8 = 0x08;
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// Reads an IDX file, decompressing it first if it starts with the gzip magic bytes.
pub fn read_idx(path: &Path, expected_rank: usize) -> Result<IdxArray, IdxError> {
    let raw = std::fs::read(path).map_err(|source| IdxError::Io {
        path: path.into(),
        source,
    })?;
    decode_idx(&raw, expected_rank, path)
}

/// The contents of an IDX file, gzip-compressed or plain; `path` only names it in errors.
pub fn decode_idx(raw: &[u8], expected_rank: usize, path: &Path) -> Result<IdxArray, IdxError> {
    let decompressed;
    let bytes = if raw.starts_with(&GZIP_MAGIC) {
        let mut out = Vec::with_capacity(raw.len() * 4);
        flate2::read::GzDecoder::new(raw)
            .read_to_end(&mut out)
            .map_err(|source| IdxError::Gzip {
                path: path.into(),
                source,
            })?;
        decompressed = out;
        &decompressed
    } else {
        raw
    };
    parse_idx(bytes, expected_rank).map_err(|what| IdxError::Format {
        path: path.into(),
        what,
    })
}

/// Parses the bytes of an (uncompressed) IDX file of unsigned bytes with `expected_rank`
/// dimensions. The value count must match the header exactly.
pub fn parse_idx(bytes: &[u8], expected_rank: usize) -> Result<IdxArray, String> {
    if bytes.len() < 4 {
        return Err(format!(
            "too short for an IDX header ({} bytes)",
            bytes.len()
        ));
    }
    let magic = &bytes[..4];
    if magic[0] != 0 || magic[1] != 0 {
        return Err(format!(
            "bad magic number {:02x}{:02x}{:02x}{:02x}: not an IDX file",
            magic[0], magic[1], magic[2], magic[3]
        ));
    }
    if magic[2] != UNSIGNED_BYTE {
        return Err(format!(
            "IDX type code 0x{:02x}, expected 0x08 (unsigned bytes)",
            magic[2]
        ));
    }
    let rank = magic[3] as usize;
    if rank != expected_rank {
        return Err(format!(
            "IDX file has {rank} dimensions, expected {expected_rank}"
        ));
    }
    let header_len = 4 + 4 * rank;
    if bytes.len() < header_len {
        return Err(format!(
            "truncated header: {} bytes, need {header_len}",
            bytes.len()
        ));
    }
    let dims: Vec<usize> = bytes[4..header_len]
        .chunks_exact(4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .collect();
    let count = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| format!("dimensions {dims:?} overflow"))?;
    let body = bytes.len() - header_len;
    if body != count {
        let kind = if body < count {
            "truncated"
        } else {
            "trailing bytes"
        };
        return Err(format!(
            "{kind}: header {dims:?} promises {count} values, file holds {body}"
        ));
    }
    Ok(IdxArray {
        dims,
        values: bytes[header_len..].to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(rank: u8, dims: &[u32]) -> Vec<u8> {
        let mut b = vec![0, 0, UNSIGNED_BYTE, rank];
        for d in dims {
            b.extend_from_slice(&d.to_be_bytes());
        }
        b
    }

    #[test]
    fn parses_a_small_image_file() {
        let mut b = header(3, &[2, 2, 3]);
        b.extend(0u8..12);
        let a = parse_idx(&b, 3).unwrap();
        assert_eq!(a.dims, vec![2, 2, 3]);
        assert_eq!(a.values, (0u8..12).collect::<Vec<_>>());
    }

    #[test]
    fn rejects_what_is_not_idx() {
        assert!(parse_idx(b"PK\x03\x04rest", 1)
            .unwrap_err()
            .contains("bad magic"));
        assert!(parse_idx(&[0, 0, 0x0d, 1, 0, 0, 0, 0], 1)
            .unwrap_err()
            .contains("type code"));
        assert!(parse_idx(&header(1, &[3]), 3)
            .unwrap_err()
            .contains("expected 3"));
        assert!(parse_idx(&[0, 0], 1).unwrap_err().contains("too short"));
        assert!(parse_idx(&header(3, &[1, 2])[..12], 3)
            .unwrap_err()
            .contains("truncated header"));
    }

    #[test]
    fn value_count_must_match_the_header() {
        let mut b = header(1, &[5]);
        b.extend([1, 2, 3]);
        assert!(parse_idx(&b, 1).unwrap_err().starts_with("truncated"));
        b.extend([4, 5, 6]);
        assert!(parse_idx(&b, 1).unwrap_err().starts_with("trailing bytes"));
        let huge = header(3, &[u32::MAX, u32::MAX, u32::MAX]);
        assert!(parse_idx(&huge, 3).unwrap_err().contains("overflow"));
    }
}
