//! The IDX reader on arbitrary bytes: never a panic, and what it accepts is self-consistent,
//! whether the bytes come plain, as one gzip member, as several, or with more data after them
//! than the header promises.
#![no_main]

use std::io::Write;
use std::path::Path;

use bnlab::data::idx::{decode_idx, parse_idx};
use libfuzzer_sys::fuzz_target;

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(bytes).expect("writing to a Vec");
    gz.finish().expect("writing to a Vec")
}

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
        let decoded = decode_idx(&gzip(data), rank, Path::new("fuzz"));
        assert_eq!(decoded.ok(), parsed.as_ref().ok().cloned());
        // Cut into two members at a point the data chooses: the same file.
        let cut = data.first().map_or(0, |&b| b as usize % (data.len() + 1));
        let mut members = gzip(&data[..cut]);
        members.extend(gzip(&data[cut..]));
        let decoded = decode_idx(&members, rank, Path::new("fuzz"));
        assert_eq!(decoded.ok(), parsed.as_ref().ok().cloned());
        // More than the header promises, in a stream far longer than the promise: refused.
        if parsed.is_ok() {
            let mut longer = data.to_vec();
            longer.extend(std::iter::repeat_n(0, 1 << 16));
            assert!(decode_idx(&gzip(&longer), rank, Path::new("fuzz")).is_err());
        }
    }
});
