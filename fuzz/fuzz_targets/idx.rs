//! The IDX reader on arbitrary bytes: never a panic, and what it accepts is self-consistent.
#![no_main]

use std::io::Write;
use std::path::Path;

use bnlab::data::idx::{decode_idx, parse_idx};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Ranks 1 and 3 are the label and image files; 0 and 2 are wrong for either.
    for rank in 0..=3 {
        let parsed = parse_idx(data, rank);
        if let Ok(array) = &parsed {
            let header = 4 + 4 * rank;
            assert_eq!(array.dims.len(), rank);
            assert_eq!(array.values.len(), array.dims.iter().product::<usize>());
            assert_eq!(array.values.as_slice(), &data[header..]);
        }
        // Through the file path: raw bytes (which may look like gzip), and the same bytes
        // gzip-compressed, which must decode to exactly what parse_idx says.
        let _ = decode_idx(data, rank, Path::new("fuzz"));
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(data).expect("writing to a Vec");
        let compressed = gz.finish().expect("writing to a Vec");
        let decoded = decode_idx(&compressed, rank, Path::new("fuzz"));
        assert_eq!(decoded.ok(), parsed.ok());
    }
});
