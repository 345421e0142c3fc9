//! The IDX file format of MNIST and Fashion-MNIST, gzip-compressed or plain.
//!
//! An IDX file is a 4-byte magic number (two zero bytes, a type code, the number of
//! dimensions), one big-endian u32 per dimension, then the values. Fashion-MNIST uses unsigned
//! bytes (type code 0x08): images have 3 dimensions (count, rows, columns), labels 1.

use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};

/// What can be wrong with a data file. The message names the file and what is wrong; the
/// caller adds how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum IdxError {
    /// The file cannot be read.
    #[error("{path}: cannot read: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file starts as gzip but does not decompress.
    #[error("{path}: corrupt or truncated gzip data ({source})")]
    Gzip {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The (decompressed) bytes are not an IDX file of unsigned bytes of the expected rank.
    #[error("{path}: {what}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
}

/// A parsed IDX file of unsigned bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdxArray {
    /// The size of each dimension, outermost first.
    pub dims: Vec<usize>,
    /// The values in row-major order: the product of `dims` of them.
    pub values: Vec<u8>,
}

const UNSIGNED_BYTE: u8 = 0x08;
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// The most values an IDX file may promise: Fashion-MNIST's largest holds 47 million, and a
/// header promising more than this is damaged (or hostile), not a data set.
pub const MAX_VALUES: usize = 1 << 30;

/// Reads an IDX file, decompressing it first if it starts with the gzip magic bytes.
pub fn read_idx(path: &Path, expected_rank: usize) -> Result<IdxArray, IdxError> {
    let io = |source| IdxError::Io {
        path: path.into(),
        source,
    };
    let mut reader = std::io::BufReader::new(std::fs::File::open(path).map_err(io)?);
    let gzip = reader.fill_buf().map_err(io)?.starts_with(&GZIP_MAGIC);
    read_stream(reader, gzip, expected_rank, path)
}

/// The contents of an IDX file, gzip-compressed or plain; `path` only names it in errors.
pub fn decode_idx(raw: &[u8], expected_rank: usize, path: &Path) -> Result<IdxArray, IdxError> {
    read_stream(raw, raw.starts_with(&GZIP_MAGIC), expected_rank, path)
}

/// Reads the header first and then at most the values it promises plus one byte (to see that
/// nothing follows), so that a small file which decompresses to gigabytes is refused after
/// reading what the header promised. Gzip may come in several members (pigz, bgzip,
/// `cat a.gz b.gz`).
fn read_stream(
    reader: impl Read,
    gzip: bool,
    expected_rank: usize,
    path: &Path,
) -> Result<IdxArray, IdxError> {
    let mut reader: Box<dyn Read> = match gzip {
        true => Box::new(flate2::read::MultiGzDecoder::new(reader)),
        false => Box::new(reader),
    };
    let failed = |source| match gzip {
        true => IdxError::Gzip {
            path: path.into(),
            source,
        },
        false => IdxError::Io {
            path: path.into(),
            source,
        },
    };
    let format = |what| IdxError::Format {
        path: path.into(),
        what,
    };
    let mut head = read_up_to(&mut reader, 4).map_err(failed)?;
    if head.len() == 4 {
        head.extend(read_up_to(&mut reader, 4 * expected_rank).map_err(failed)?);
    }
    let (dims, count) = match parse_header(&head, expected_rank) {
        Ok(header) => header,
        // In a gzip file a nonsensical header is more often damage to the compressed stream
        // (a broken Huffman table garbles everything after it): read on, into nothing and at
        // most 64 MiB, to tell the two apart.
        Err(what) if gzip => {
            let rest = std::io::copy(&mut reader.take(64 << 20), &mut std::io::sink());
            return Err(rest.err().map_or_else(|| format(what), failed));
        }
        Err(what) => return Err(format(what)),
    };
    // Grown as the data arrives, so a header's promise alone allocates little.
    let mut values = Vec::with_capacity(count.min(64 << 20));
    reader
        .take(count as u64 + 1)
        .read_to_end(&mut values)
        .map_err(failed)?;
    match count_mismatch(&dims, count, values.len()) {
        Some(what) => Err(format(what)),
        None => Ok(IdxArray { dims, values }),
    }
}

/// Reads until `n` bytes or the end of the stream.
fn read_up_to(reader: &mut dyn Read, n: usize) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(n);
    reader.take(n as u64).read_to_end(&mut out)?;
    Ok(out)
}

/// Parses the bytes of an (uncompressed) IDX file of unsigned bytes with `expected_rank`
/// dimensions. The value count must match the header exactly.
pub fn parse_idx(bytes: &[u8], expected_rank: usize) -> Result<IdxArray, String> {
    let (dims, count) = parse_header(bytes, expected_rank)?;
    let values = &bytes[4 + 4 * expected_rank..];
    match count_mismatch(&dims, count, values.len()) {
        Some(what) => Err(what),
        None => Ok(IdxArray {
            dims,
            values: values.to_vec(),
        }),
    }
}

/// The dimensions and value count of the header at the start of `bytes`.
fn parse_header(bytes: &[u8], expected_rank: usize) -> Result<(Vec<usize>, usize), String> {
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
    if count > MAX_VALUES {
        return Err(format!(
            "header {dims:?} promises {count} values, more than any IDX data set bnlab reads \
             ({MAX_VALUES})"
        ));
    }
    Ok((dims, count))
}

/// What is wrong when `held` values follow a header promising `count` (`held` is `count + 1`
/// when the reader stopped one byte past the promise).
fn count_mismatch(dims: &[usize], count: usize, held: usize) -> Option<String> {
    match held.cmp(&count) {
        std::cmp::Ordering::Equal => None,
        std::cmp::Ordering::Less => Some(format!(
            "truncated: header {dims:?} promises {count} values, file holds {held}"
        )),
        std::cmp::Ordering::Greater => Some(format!(
            "trailing bytes: header {dims:?} promises {count} values, and more follow"
        )),
    }
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
