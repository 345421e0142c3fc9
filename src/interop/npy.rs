//! NumPy `.npy` files (format version 1.0), the simplest array file Python reads with no extra
//! package: `numpy.load(path)`.

use std::path::Path;

use anyhow::Context;

use crate::report::Existing;

/// An element type `.npy` can describe.
pub trait NpyElement: Copy {
    /// NumPy's type string (`<f4`: little-endian float32).
    const DESCR: &'static str;
    /// Appends the value's little-endian bytes to `out`.
    fn append_le(self, out: &mut Vec<u8>);
}

impl NpyElement for f32 {
    const DESCR: &'static str = "<f4";
    fn append_le(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
}

impl NpyElement for u8 {
    const DESCR: &'static str = "|u1";
    fn append_le(self, out: &mut Vec<u8>) {
        out.push(self);
    }
}

/// The bytes of a C-order `.npy` array of `shape`.
///
/// # Panics
/// If `values` does not hold `shape`'s element count (a caller's bug, not an input error).
pub fn encode<T: NpyElement>(values: &[T], shape: &[usize]) -> Vec<u8> {
    assert_eq!(
        values.len(),
        shape.iter().product::<usize>(),
        "npy: values do not fill shape {shape:?}"
    );
    let dims: String = match shape {
        [one] => format!("{one},"),
        _ => shape
            .iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join(", "),
    };
    let mut header = format!(
        "{{'descr': '{}', 'fortran_order': False, 'shape': ({dims}), }}",
        T::DESCR
    );
    // The format wants magic (6) + version (2) + length (2) + header, ending in '\n', to be a
    // multiple of 64 bytes so that the data is aligned.
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat(unpadded.next_multiple_of(64) - unpadded));
    header.push('\n');

    let mut out = Vec::with_capacity(10 + header.len() + std::mem::size_of_val(values));
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for &v in values {
        v.append_le(&mut out);
    }
    out
}

/// Writes [`encode`]'s bytes to `path` atomically, through the one output function that
/// refuses devices, FIFOs, links and directories, and an existing file unless `replace`.
pub fn write<T: NpyElement>(
    path: &Path,
    values: &[T],
    shape: &[usize],
    replace: bool,
) -> anyhow::Result<()> {
    crate::report::write_file(path, &encode(values, shape), Existing::replace_if(replace))
        .with_context(|| format!("{}: cannot write", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_is_padded_to_64_bytes_and_the_data_follows() {
        let bytes = encode(&[1.0f32, -2.5, 3.0, 4.0, 5.0, 6.0], &[2, 3]);
        assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00");
        let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        assert_eq!((10 + header_len) % 64, 0);
        let header = std::str::from_utf8(&bytes[10..10 + header_len]).unwrap();
        assert!(header.contains("'descr': '<f4'"), "{header}");
        assert!(header.contains("'shape': (2, 3)"), "{header}");
        assert!(header.ends_with('\n'));
        let data = &bytes[10 + header_len..];
        assert_eq!(data.len(), 24);
        assert_eq!(&data[4..8], &(-2.5f32).to_le_bytes());
    }

    #[test]
    fn a_vector_shape_has_the_trailing_comma_of_a_python_tuple() {
        let bytes = encode(&[7u8, 8, 9], &[3]);
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.contains("'shape': (3,)"), "{text}");
        assert!(text.contains("'descr': '|u1'"), "{text}");
        assert_eq!(&bytes[bytes.len() - 3..], &[7, 8, 9]);
    }
}
